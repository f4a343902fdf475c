"""The shop's Django settings, configured in code, and its tables.

Two database aliases, both through PgBouncer, as many Django projects have them:
``default`` for the web views (transaction pooling, CONN_MAX_AGE=60) and ``reports`` for
background report jobs (a session-pooled PgBouncer database, CONN_MAX_AGE=None).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

WEB_APP = "shop-web"
REPORTS_APP = "shop-reports"
WEB_CONN_MAX_AGE = 60
PRODUCTS = 10


def database(host: str, port: int, name: str, user: str, password: str, app: str, max_age: int | None) -> dict:
    return {
        "ENGINE": "django_prometheus.db.backends.postgresql",  # Django's, counting connections and errors
        "HOST": host,
        "PORT": port,
        "NAME": name,
        "USER": user,
        "PASSWORD": password,
        "CONN_MAX_AGE": max_age,
        "CONN_HEALTH_CHECKS": True,
        "DISABLE_SERVER_SIDE_CURSORS": True,  # required behind PgBouncer's transaction pooling
        "OPTIONS": {"application_name": app, "connect_timeout": 5},
    }


def configure(databases: dict[str, dict[str, Any]]) -> None:
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        SECRET_KEY=secrets.token_hex(16),
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        ROOT_URLCONF="django_db_tools.demo.views",
        INSTALLED_APPS=["django_db_tools.demo"],
        MIDDLEWARE=[],
        DATABASES=databases,
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        LOGGING_CONFIG=None,
    )
    django.setup()
    # Failed requests are the point of some phases; the live view reports them.
    logging.getLogger("django").setLevel(logging.CRITICAL + 1)


def create_tables() -> None:
    from django.db import connection

    from .models import Order, Product

    with connection.schema_editor() as editor:
        editor.create_model(Product)
        editor.create_model(Order)
    Product.objects.bulk_create([Product(name=f"product {number}") for number in range(1, PRODUCTS + 1)])
    connection.close()


def wsgi_application() -> Any:
    from django.core.handlers.wsgi import WSGIHandler

    return WSGIHandler()


def close_connections() -> None:
    """Close this thread's Django connections (run by each worker thread as it ends)."""
    from django.db import connections

    connections.close_all()
