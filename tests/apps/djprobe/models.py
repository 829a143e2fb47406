from django.db import models


class Hit(models.Model):
    """One request or task: the process that ran it and the session it used
    (helpers_procs.session_of: backend, client)."""

    n = models.IntegerField(default=0)
    pid = models.IntegerField()
    backend = models.IntegerField()
    client = models.IntegerField()

    class Meta:
        app_label = "djprobe"
