"""Django settings, every one read from a ``WEBAPP_*`` environment variable.

Database: ``WEBAPP_DB_HOST``, ``WEBAPP_DB_PORT``, ``WEBAPP_DB_NAME``, ``WEBAPP_DB_USER``, ``WEBAPP_DB_PASSWORD``,
``WEBAPP_APP_NAME`` (the connections' ``application_name``), ``WEBAPP_CONN_MAX_AGE`` (seconds, or ``none`` for
persistent connections; 0 by default, as in Django).

Pool: ``WEBAPP_POOL`` is empty (no pool), ``django`` (Django 5.1's ``OPTIONS["pool"]``, psycopg_pool) or
``sqlalchemy`` (django-db-connection-pool's QueuePool). ``WEBAPP_POOL_MIN_SIZE``, ``WEBAPP_POOL_MAX_SIZE``,
``WEBAPP_POOL_TIMEOUT`` (seconds) size both; ``WEBAPP_POOL_OVERFLOW`` is the QueuePool's ``MAX_OVERFLOW``.

``WEBAPP_PROMETHEUS=1`` adds django-prometheus: its middleware, its database backend (without a pool or with
Django's own) and ``/metrics``; with Django's pool, the pool's figures too (``pool_metrics.py``). Several gunicorn
workers are exposed one of two ways: ``WEBAPP_PROMETHEUS_PORTS`` (comma-separated ports, given to
``PROMETHEUS_METRICS_EXPORT_PORT_RANGE``: each worker serves its own on the first free one), or
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode: ``/metrics`` serves all workers' sum).
``WEBAPP_SERVER_SIDE_CURSORS=1`` lets ``QuerySet.iterator()`` declare server-side cursors (off by default, as
transaction pooling wants); ``WEBAPP_PREPARE_THRESHOLD=N`` turns on ``server_side_binding`` with psycopg's
``prepare_threshold`` N in OPTIONS. ``WEBAPP_LOG_FILE`` is where Django's log goes (stderr when unset): failed
requests are logged there with their traceback, as ``django.request`` logs them.
"""

from __future__ import annotations

import os

ENV = os.environ


def _number(name: str, default: float) -> float:
    return float(ENV.get(name) or default)


def _conn_max_age() -> int | None:
    value = ENV.get("WEBAPP_CONN_MAX_AGE", "0").strip().lower()
    return None if value in ("none", "null") else int(value)


POOL = ENV.get("WEBAPP_POOL", "").strip().lower()
PROMETHEUS = ENV.get("WEBAPP_PROMETHEUS", "") in ("1", "true", "yes")
if POOL not in ("", "django", "sqlalchemy"):
    raise RuntimeError(f"WEBAPP_POOL must be empty, django or sqlalchemy, not {POOL!r}")
if PROMETHEUS and POOL == "sqlalchemy":
    raise RuntimeError("django-prometheus and django-db-connection-pool each need their own database backend")


def _database() -> dict:
    options: dict = {"application_name": ENV.get("WEBAPP_APP_NAME", "webapp"), "connect_timeout": 5}
    engine = "django_prometheus.db.backends.postgresql" if PROMETHEUS else "django.db.backends.postgresql"
    database = {
        "ENGINE": engine,
        "HOST": ENV.get("WEBAPP_DB_HOST", "127.0.0.1"),
        "PORT": int(ENV.get("WEBAPP_DB_PORT", "5432")),
        "NAME": ENV.get("WEBAPP_DB_NAME", "postgres"),
        "USER": ENV.get("WEBAPP_DB_USER", "postgres"),
        "PASSWORD": ENV.get("WEBAPP_DB_PASSWORD", ""),
        "CONN_MAX_AGE": _conn_max_age(),
        # PgBouncer's transaction pooling needs it; WEBAPP_SERVER_SIDE_CURSORS=1 leaves Django's default
        "DISABLE_SERVER_SIDE_CURSORS": ENV.get("WEBAPP_SERVER_SIDE_CURSORS", "") not in ("1", "true", "yes"),
        "OPTIONS": options,
    }
    if ENV.get("WEBAPP_PREPARE_THRESHOLD", ""):  # psycopg prepares statements after that many uses
        options["server_side_binding"] = True
        options["prepare_threshold"] = int(ENV["WEBAPP_PREPARE_THRESHOLD"])
    if POOL == "django":
        database["CONN_MAX_AGE"] = 0  # Django refuses a pool with persistent connections
        options["pool"] = {
            "min_size": int(_number("WEBAPP_POOL_MIN_SIZE", 1)),
            "max_size": int(_number("WEBAPP_POOL_MAX_SIZE", 4)),
            "timeout": _number("WEBAPP_POOL_TIMEOUT", 30),
        }
    elif POOL == "sqlalchemy":
        database["ENGINE"] = "dj_db_conn_pool.backends.postgresql"
        database["POOL_OPTIONS"] = {
            "POOL_SIZE": int(_number("WEBAPP_POOL_MAX_SIZE", 4)),
            "MAX_OVERFLOW": int(_number("WEBAPP_POOL_OVERFLOW", 0)),
            "TIMEOUT": _number("WEBAPP_POOL_TIMEOUT", 30),
            "RECYCLE": 900,
        }
    return database


SECRET_KEY = ENV.get("WEBAPP_SECRET_KEY", "webapp-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "django_db_tools.webapp.urls"
INSTALLED_APPS: list[str] = ["django_db_tools.webapp", *(["django_prometheus"] if PROMETHEUS else [])]
_PROMETHEUS_MIDDLEWARE = "django_prometheus.middleware.Prometheus"
MIDDLEWARE: list[str] = (
    [_PROMETHEUS_MIDDLEWARE + "BeforeMiddleware", _PROMETHEUS_MIDDLEWARE + "AfterMiddleware"] if PROMETHEUS else []
)
DATABASES = {"default": _database()}
if PROMETHEUS and ENV.get("WEBAPP_PROMETHEUS_PORTS"):
    PROMETHEUS_METRICS_EXPORT_PORT_RANGE = [int(p) for p in ENV["WEBAPP_PROMETHEUS_PORTS"].split(",")]
    PROMETHEUS_METRICS_EXPORT_ADDRESS = "127.0.0.1"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_LOG_FILE = ENV.get("WEBAPP_LOG_FILE", "")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(process)d: %(message)s"}},
    "handlers": {
        "out": (
            {"class": "logging.FileHandler", "filename": _LOG_FILE, "formatter": "plain"}
            if _LOG_FILE
            else {"class": "logging.StreamHandler", "formatter": "plain"}
        )
    },
    "loggers": {"django": {"handlers": ["out"], "level": "INFO", "propagate": False}},
}
