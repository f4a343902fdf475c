"""The views: one that queries, one that holds a transaction open, one that holds a connection busy."""

from __future__ import annotations

import os
import time

from django.db import connection, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse

from .models import Relation

MAX_SECONDS = 30.0


def _seconds(request: HttpRequest, default: float) -> float:
    return min(float(request.GET.get("seconds", default)), MAX_SECONDS)


def health(request: HttpRequest) -> HttpResponse:
    """Answers without touching the database: the harness waits for it."""
    return HttpResponse("ok\n", content_type="text/plain")


def query(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), current_setting('application_name')")
        pid, app = cursor.fetchone()
    return JsonResponse({"backend_pid": pid, "application_name": app, "worker_pid": os.getpid()})


def hold_transaction(request: HttpRequest) -> JsonResponse:
    """Opens a transaction, then waits in Python: the server sees the session idle in transaction."""
    seconds = _seconds(request, 5)
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
        time.sleep(seconds)
    return JsonResponse({"backend_pid": pid, "held": seconds})


def sleep(request: HttpRequest) -> JsonResponse:
    """Keeps the connection busy on the server (``pg_sleep``): a pool cannot hand it to anyone else."""
    seconds = _seconds(request, 1)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), pg_sleep(%s)", [seconds])
        pid = cursor.fetchone()[0]
    return JsonResponse({"backend_pid": pid, "slept": seconds})


def failing_query(request: HttpRequest) -> JsonResponse:
    """A statement PostgreSQL refuses: the request fails with a database error (ProgrammingError)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM no_such_table")
    return JsonResponse({})


def pool_stats(request: HttpRequest) -> JsonResponse:
    """Django's own pool's counters in this worker process (``{}`` without one)."""
    pool = getattr(connection, "pool", None)
    return JsonResponse({"worker_pid": os.getpid(), "stats": pool.get_stats() if pool is not None else {}})


def iterate(request: HttpRequest) -> JsonResponse:
    """Reads pg_class through QuerySet.iterator(): a server-side cursor read in chunks, unless
    DISABLE_SERVER_SIDE_CURSORS is set. Behind transaction pooling each FETCH may reach another server."""
    chunk = int(request.GET.get("chunk", 50))
    count = sum(1 for _ in Relation.objects.order_by("oid").only("oid").iterator(chunk_size=chunk))
    return JsonResponse({"rows": count})


def prepared(request: HttpRequest) -> JsonResponse:
    """The same parameterised statements a few times: with a prepare_threshold in OPTIONS psycopg prepares them,
    on the server connection it has at that moment."""
    times = int(request.GET.get("times", 3))
    total = 0
    with connection.cursor() as cursor:
        for n in range(times):
            cursor.execute("SELECT count(*) FROM pg_class WHERE oid > %s", [n])
            total += cursor.fetchone()[0]
            cursor.execute("SELECT 1")
            total += cursor.fetchone()[0]
    return JsonResponse({"total": total})
