from __future__ import annotations

from django.apps import AppConfig


class WebappConfig(AppConfig):
    name = "django_db_tools.webapp"
    label = "webapp"
    default_auto_field = "django.db.models.BigAutoField"
