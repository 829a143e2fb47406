from django.db import models


class Hit(models.Model):
    """One request or task: the process that ran it and the backend it used."""

    n = models.IntegerField(default=0)
    pid = models.IntegerField()
    backend = models.IntegerField()
    backend_start = models.DateTimeField()

    class Meta:
        app_label = "djprobe"
