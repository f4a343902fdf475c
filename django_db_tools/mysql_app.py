"""A small Django application on MySQL or MariaDB, through PyMySQL, served by long-lived worker threads.

    python -m django_db_tools.mysql_app --port 3306 --user app --password ... --database appdb \\
        --conn-max-age 60 --log app.log

Prints ``listening on <port>`` once it serves. Every worker thread keeps its own Django connection
(CONN_MAX_AGE), as under gunicorn's gthread workers. Failed requests are logged with their traceback
to ``--log``, as Django logs them, for the check to follow. Views:

- ``/items``: one query.
- ``/hold?seconds=S``: a query, then the request holds its connection for S seconds.
- ``/transaction?seconds=S``: a row updated in a transaction left open for S seconds.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import time
from typing import Any

from .demo.server import PooledWSGIServer, WorkerPool


def configure(args: argparse.Namespace) -> None:
    import django
    import pymysql
    from django.conf import settings

    pymysql.install_as_MySQLdb()
    settings.configure(
        DEBUG=False,
        SECRET_KEY=secrets.token_hex(16),
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.mysql",
                "HOST": "127.0.0.1",
                "PORT": args.port,
                "NAME": args.database,
                "USER": args.user,
                "PASSWORD": args.password,
                "CONN_MAX_AGE": args.conn_max_age,
                "CONN_HEALTH_CHECKS": args.health_checks,
                "OPTIONS": {"connect_timeout": 5},
            }
        },
        USE_TZ=True,
        LOGGING_CONFIG=None,
    )
    django.setup()
    handler = logging.FileHandler(args.log) if args.log else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("django.request")
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR)


def items(request: Any) -> Any:
    from django.db import connection
    from django.http import JsonResponse

    with connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM items")
        (count,) = cursor.fetchone()
    return JsonResponse({"items": count})


def hold(request: Any) -> Any:
    response = items(request)
    time.sleep(float(request.GET.get("seconds", "1")))
    return response


def open_transaction(request: Any) -> Any:
    from django.db import connection, transaction
    from django.http import JsonResponse

    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("UPDATE items SET name = name WHERE id = 1")
        time.sleep(float(request.GET.get("seconds", "1")))
    return JsonResponse({"held": True})


def _urls() -> list[Any]:
    from django.urls import path

    return [path("items", items), path("hold", hold), path("transaction", open_transaction)]


def __getattr__(name: str) -> Any:
    if name == "urlpatterns":  # read by Django once configured
        return _urls()
    raise AttributeError(name)


def create_tables() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS items (id INT PRIMARY KEY, name VARCHAR(50)) ENGINE=InnoDB")
        cursor.execute("INSERT IGNORE INTO items VALUES (1, 'one')")
    connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="the MySQL server's port on 127.0.0.1")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--conn-max-age", type=lambda v: None if v == "None" else int(v), default=60)
    parser.add_argument("--health-checks", action="store_true", help="CONN_HEALTH_CHECKS=True")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--log", default="")
    args = parser.parse_args(argv)
    configure(args)
    create_tables()
    from django.core.handlers.wsgi import WSGIHandler
    from django.db import connections

    pool = WorkerPool(args.threads, "django", on_exit=connections.close_all)
    server = PooledWSGIServer(("127.0.0.1", 0), WSGIHandler(), pool)
    print(f"listening on {server.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        pool.shutdown(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
