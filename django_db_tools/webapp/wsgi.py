from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_db_tools.webapp.settings")
application = get_wsgi_application()

from django.conf import settings  # noqa: E402 - once Django is set up

if settings.PROMETHEUS and settings.POOL == "django" and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    from . import pool_metrics  # noqa: F401 - registers the pool's collector
