from typing import ClassVar

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies: ClassVar[list[tuple[str, str]]] = []

    operations: ClassVar[list[migrations.operations.base.Operation]] = [
        migrations.CreateModel(
            name="Hit",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("n", models.IntegerField(default=0)),
                ("pid", models.IntegerField()),
                ("backend", models.IntegerField()),
                ("client", models.IntegerField()),
            ],
        ),
    ]
