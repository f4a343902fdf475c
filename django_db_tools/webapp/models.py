"""One read-only model over PostgreSQL's own catalog, so that QuerySet.iterator() needs no table of its own."""

from __future__ import annotations

from django.db import models


class Relation(models.Model):
    """pg_class: a few hundred rows in any database."""

    oid = models.IntegerField(primary_key=True)
    relname = models.TextField()

    class Meta:
        managed = False
        db_table = "pg_class"
        app_label = "webapp"
