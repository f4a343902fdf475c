"""The web application harness: real Django under gunicorn against the sandbox's servers."""

from __future__ import annotations

import json
import os
import threading

import psycopg

from django_db_tools.sandbox import Sandbox


def backends(sandbox: Sandbox, app: str) -> list[tuple[int, str]]:
    with psycopg.connect(sandbox.postgres.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s AND backend_type = 'client backend'",
            [app],
        ).fetchall()
    return [(int(pid), str(state)) for pid, state in rows]


def test_persistent_connections_stay_one_per_thread_and_go_when_stopped(webapps, sandbox):
    app = webapps(app_name="harness-persistent", workers=2, threads=2, conn_max_age=None)
    replies = app.drive("/query/", count=40, concurrency=4)
    assert {reply.status for reply in replies} == {200}
    assert {json.loads(reply.body)["application_name"] for reply in replies} == {"harness-persistent"}
    pids = {json.loads(reply.body)["backend_pid"] for reply in replies}
    assert 1 <= len(pids) <= 4  # one connection per thread at most, kept between requests
    assert {pid for pid, _ in backends(sandbox, "harness-persistent")} == pids
    gunicorn_pid = app.proc.pid
    app.stop()
    assert backends(sandbox, "harness-persistent") == []
    try:
        os.killpg(gunicorn_pid, 0)
        raise AssertionError("gunicorn's process group outlived stop()")
    except ProcessLookupError:
        pass


def test_django_pool_keeps_its_connections_and_times_out_when_exhausted(webapps, sandbox):
    app = webapps(app_name="harness-pool", threads=4, pool="django", pool_min_size=2, pool_max_size=2, pool_timeout=1)
    replies = app.drive("/sleep/?seconds=2", count=4, concurrency=4)
    assert sorted(reply.status for reply in replies) == [200, 200, 500, 500]
    assert "couldn't get a connection after 1" in app.django_log()
    assert len(backends(sandbox, "harness-pool")) == 2
    assert json.loads(app.get("/pool/").body)["stats"]["pool_max"] == 2


def test_transaction_view_leaves_the_session_idle_in_transaction(webapps, sandbox):
    app = webapps(app_name="harness-xact", threads=2)
    holder = threading.Thread(target=app.get, args=("/transaction/?seconds=2",))
    holder.start()
    try:
        for _ in range(50):
            states = [state for _, state in backends(sandbox, "harness-xact")]
            if "idle in transaction" in states:
                break
            threading.Event().wait(0.05)
        assert "idle in transaction" in states
    finally:
        holder.join()


def test_sqlalchemy_queue_pool_times_out_when_exhausted(webapps, sandbox):
    app = webapps(app_name="harness-queuepool", threads=4, pool="sqlalchemy", pool_max_size=2, pool_timeout=1)
    replies = app.drive("/sleep/?seconds=2", count=4, concurrency=4)
    assert sorted(reply.status for reply in replies) == [200, 200, 500, 500]
    assert "QueuePool limit of size 2 overflow 0 reached" in app.django_log()
    assert len(backends(sandbox, "harness-queuepool")) == 2


def test_django_prometheus_counts_new_connections(webapps):
    app = webapps(app_name="harness-prometheus", threads=2, prometheus=True)
    assert {reply.status for reply in app.drive("/query/", count=5)} == {200}
    metrics = app.get("/metrics").body
    assert "django_db_new_connections_total" in metrics
