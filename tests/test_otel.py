"""OpenTelemetry's current pool metrics against real servers: PostgreSQL and PgBouncer (the suite's
sandbox), and Django 5.1's pool under gunicorn. Each figure is compared with what the server or the pool
itself says at that moment; the legacy name stays as it was."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.config import parse
from datadog_checks.django_db.evaluate.pgbouncer import pgbouncer_metrics
from datadog_checks.django_db.evaluate.postgres import postgres_metrics
from django_db_tools.sandbox import SUPERUSER, SUPERUSER_PASSWORD, Sandbox

from .conftest import metric_values

CURRENT = "db.client.connection."
COUNT = CURRENT + "count"


def pool_figures(aggregator, pool: str) -> dict[str, float]:
    """What the check sent for one pool under the current names: used, idle, max, idle.min, pending, timeouts."""
    tag = f"{CURRENT}pool.name:{pool}"
    figures = {}
    for state in ("used", "idle"):
        [figures[state]] = metric_values(aggregator, COUNT, tag, f"{CURRENT}state:{state}")
    for name in ("max", "idle.min", "pending_requests", "timeouts"):
        values = metric_values(aggregator, CURRENT + name, tag)
        assert len(values) <= 1, (name, values)
        if values:
            figures[name] = values[0]
    return figures


def console(sandbox: Sandbox, user: str = Sandbox.MONITOR_USER, password: str = Sandbox.MONITOR_PASSWORD):
    return psycopg.connect(
        host="127.0.0.1", port=sandbox.pgbouncer.port, user=user, password=password, dbname="pgbouncer",
        autocommit=True, cursor_factory=psycopg.ClientCursor, prepare_threshold=None,
    )  # fmt: skip


def show(sandbox: Sandbox, what: str) -> list[dict]:
    with console(sandbox) as conn:
        cursor = conn.execute(f"SHOW {what}")
        names = [c.name for c in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def set_pgbouncer(sandbox: Sandbox, setting: str, value: object) -> None:
    with console(sandbox, SUPERUSER, SUPERUSER_PASSWORD) as conn:
        conn.execute(f"SET {setting} = '{value}'")


def activity(sandbox: Sandbox, db: str | None, exclude: list[int] | None = None) -> dict[str, int]:
    """pg_stat_activity's client backends on ``db`` (None: on every database, but those of ``exclude`` and the
    one asking): idle, and every other state (used)."""
    with psycopg.connect(sandbox.postgres.dsn(), autocommit=True) as conn:
        idle, used = conn.execute(
            "SELECT count(*) FILTER (WHERE state = 'idle'), count(*) FILTER (WHERE state IS DISTINCT FROM 'idle') "
            "FROM pg_stat_activity WHERE (%s::text IS NULL OR datname = %s) AND backend_type = 'client backend' "
            "AND pid <> pg_backend_pid() AND pid <> ALL(%s::int[])",
            [db, db, exclude or []],
        ).fetchone()
        usable = conn.execute(
            "SELECT sum(setting::int) FILTER (WHERE name = 'max_connections') - coalesce(sum(setting::int) FILTER "
            "(WHERE name IN ('superuser_reserved_connections', 'reserved_connections')), 0) FROM pg_settings"
        ).fetchone()[0]
    return {"used": used, "idle": idle, "max": usable}


@pytest.fixture
def otel_pools(sandbox):
    """Two PgBouncer pools on appdb: `otel_a` (2 servers, a reserve of 1, at least 1 kept) and `otel_b` (1 server)."""
    port = sandbox.postgres.port
    sandbox.pgbouncer.databases["otel_a"] = f"host=127.0.0.1 port={port} dbname=appdb pool_size=2 reserve_pool=1 " + (
        "min_pool_size=1"
    )
    sandbox.pgbouncer.databases["otel_b"] = f"host=127.0.0.1 port={port} dbname=appdb pool_size=1 reserve_pool=0"
    sandbox.pgbouncer.reload()
    [config] = [row for row in show(sandbox, "CONFIG") if row["key"] == "query_wait_timeout"]
    yield sandbox
    set_pgbouncer(sandbox, "query_wait_timeout", config["value"])
    del sandbox.pgbouncer.databases["otel_a"], sandbox.pgbouncer.databases["otel_b"]
    sandbox.pgbouncer.reload()


def test_postgres_and_pgbouncer_pools_as_the_servers_count_them(aggregator, dd_run_check, otel_pools, clients):
    sandbox = otel_pools
    bouncer = sandbox.pgbouncer.port
    direct = clients.many(3, app="otel-direct")
    direct[0].execute("BEGIN")
    direct[0].execute("SELECT 1")  # idle in transaction: used
    holder, second = clients.many(2, app="otel-web", dbname="otel_a", port=bouncer, prepare_threshold=None)
    second.execute("SELECT 1")
    holder.execute("BEGIN")
    holder.execute("SELECT 1")  # holds a server of otel_a
    only, *waiting = clients.many(3, app="otel-web", dbname="otel_b", port=bouncer, prepare_threshold=None)
    only.execute("BEGIN")
    only.execute("SELECT 1")  # holds the one server of otel_b
    failed: list[BaseException] = []

    def wait(conn: psycopg.Connection) -> None:
        try:
            conn.execute("SELECT 1")
        except psycopg.Error as e:
            failed.append(e)

    threads = [threading.Thread(target=wait, args=(waiting[0],), daemon=True)]
    threads[0].start()
    deadline = time.monotonic() + 10
    while not any(p["database"] == "otel_b" and p["cl_waiting"] for p in show(sandbox, "POOLS")):
        assert time.monotonic() < deadline, "the client never waited"
        time.sleep(0.05)

    instance = {**sandbox.instance(), "log_files": [str(sandbox.pgbouncer.logfile)], "otel_semconv": "both"}
    check = DjangoDbCheck("django_db", {}, [instance])
    aggregator.reset()
    dd_run_check(check)
    pools = {(p["database"], p["user"]): p for p in show(sandbox, "POOLS")}
    databases = {d["name"]: d for d in show(sandbox, "DATABASES")}
    seen = activity(sandbox, "appdb")

    # PostgreSQL, one pool of the whole server: the client backends made straight to it, as pg_stat_activity
    # counts them at that moment (PgBouncer's servers are its pools' connections, and the check's own is none)
    servers = [row["remote_pid"] for row in show(sandbox, "SERVERS")]
    direct_only = activity(sandbox, None, exclude=[*servers, check.postgres.conn.info.backend_pid])
    postgres = f"127.0.0.1:{sandbox.postgres.port}"
    assert pool_figures(aggregator, postgres) == direct_only, pool_figures(aggregator, postgres)
    assert direct_only["used"] >= 1 and direct_only["idle"] >= 2  # the direct ones, one in a transaction
    # the legacy name, per database, counts every backend of appdb, PgBouncer's servers too, as before
    legacy = {f"pool.name:{postgres}/appdb"}
    assert metric_values(aggregator, "db.client.connections.usage", *legacy, "state:used") == [seen["used"]]
    assert metric_values(aggregator, "db.client.connections.usage", *legacy, "state:idle") == [seen["idle"]]

    # PgBouncer, per pool: as SHOW POOLS and SHOW DATABASES say at that moment
    for db in ("otel_a", "otel_b"):
        row, database = pools[db, "app"], databases[db]
        expected = {
            "used": row["sv_active"] + row["sv_being_canceled"] + row["sv_tested"] + row["sv_login"],
            "idle": row["sv_idle"] + row["sv_used"],
            "max": database["pool_size"] + database.get("reserve_pool_size", database.get("reserve_pool")),
            "pending_requests": row["cl_waiting"],
        }
        if database["min_pool_size"]:
            expected["idle.min"] = min(database["pool_size"], database["min_pool_size"])
        assert pool_figures(aggregator, f"127.0.0.1:{bouncer}/{db}/app") == expected, (db, row)
    assert pool_figures(aggregator, f"127.0.0.1:{bouncer}/otel_a/app")["max"] == 3
    assert pool_figures(aggregator, f"127.0.0.1:{bouncer}/otel_a/app")["idle.min"] == 1
    assert pool_figures(aggregator, f"127.0.0.1:{bouncer}/otel_b/app")["pending_requests"] == 1

    # Clients that give up waiting: each counted once, in the pool PgBouncer's log names
    set_pgbouncer(sandbox, "query_wait_timeout", 1)
    threads.append(threading.Thread(target=wait, args=(waiting[1],), daemon=True))
    threads[1].start()
    for thread in threads:
        thread.join(15)
    assert len(failed) == 2 and all("query_wait_timeout" in str(e) for e in failed), failed
    time.sleep(0.2)  # PgBouncer writes its log line as it closes the client
    aggregator.reset()
    dd_run_check(check)
    check.cancel()
    otel_b = pool_figures(aggregator, f"127.0.0.1:{bouncer}/otel_b/app")
    assert otel_b["timeouts"] == 2 and otel_b["pending_requests"] == 0
    assert "timeouts" not in pool_figures(aggregator, f"127.0.0.1:{bouncer}/otel_a/app")
    [timeouts] = aggregator.metrics(CURRENT + "timeouts")
    assert timeouts.type == aggregator.COUNT


def test_legacy_is_unchanged_and_current_adds_only_its_names(aggregator, dd_run_check, sandbox, clients):
    """One snapshot of each server, evaluated under each option: legacy (the default) sends what it sent
    before the option came, byte for byte; both adds the current names and nothing else."""
    clients.many(2, app="otel-legacy")
    clients.connect(app="otel-legacy", port=sandbox.pgbouncer.port, prepare_threshold=None).execute("SELECT 1")
    instance = sandbox.instance()
    check = DjangoDbCheck("django_db", {}, [instance])
    pg = check.postgres.snapshot()
    pgb = check.pgbouncer.snapshot()
    by_option = {
        option: (postgres_metrics(pg, settings, {"appdb": 1})[0], list(pgbouncer_metrics(pgb, settings)))
        for option, settings in (
            ("default", parse(instance)),
            ("legacy", parse({**instance, "otel_semconv": "legacy"})),
            ("both", parse({**instance, "otel_semconv": "both"})),
            ("current", parse({**instance, "otel_semconv": "current"})),
        )
    }
    check.cancel()
    default = by_option["default"]
    assert by_option["legacy"] == default
    assert not any(m.name.startswith(CURRENT) for m in default[0] + default[1])
    both, current = by_option["both"], by_option["current"]
    assert [m for m in both[0] if not m.name.startswith(CURRENT)] == default[0]
    assert {m.name for m in both[0] if m.name.startswith(CURRENT)} == {COUNT, CURRENT + "max"}
    assert current[0] == [m for m in both[0] if m.name != "db.client.connections.usage"]
    assert both[1] == current[1] == default[1]  # PgBouncer's pools come after the run's logs, in the check

    # A whole run: the default sends no current name, and the same legacy series as before
    run = DjangoDbCheck("django_db", {}, [instance])
    aggregator.reset()
    dd_run_check(run)
    run.cancel()
    assert not [name for name in aggregator.metric_names if name.startswith(CURRENT)]
    assert metric_values(aggregator, "db.client.connections.usage")


def stats(app) -> dict[str, float]:
    """The pool's own get_stats() in the application's one worker."""
    reply = app.get("/pool/")
    assert reply.status == 200, reply.body
    return json.loads(reply.body)["stats"]


def test_django_pool_as_its_own_statistics_say(aggregator, dd_run_check, pg_instance, webapps):
    app = webapps(
        app_name="otel-pool", workers=1, threads=6, pool="django", pool_min_size=2, pool_max_size=3, pool_timeout=3,
        prometheus=True, prometheus_ports=1,
    )  # fmt: skip
    [url] = app.metrics_urls
    instance = {**pg_instance, "django_metrics": [{"url": url, "app": "otel-pool"}], "otel_semconv": "current"}
    check = DjangoDbCheck("django_db", {}, [instance])
    assert app.get("/query/").status == 200  # the pool opens min_size connections
    dd_run_check(check)
    before = stats(app)
    with ThreadPoolExecutor(max_workers=5) as requests:
        # three hold the pool's three connections for 5 s; two wait for one and give up after 3 s
        replies = [requests.submit(app.get, "/sleep/?seconds=5") for _ in range(5)]
        deadline = time.monotonic() + 10
        while stats(app).get("requests_waiting", 0) < 2:
            assert time.monotonic() < deadline, stats(app)
            time.sleep(0.05)
        aggregator.reset()
        dd_run_check(check)
        during = stats(app)
        statuses = sorted(r.result().status for r in replies)
    assert statuses == [200, 200, 200, 500, 500]
    pool = pool_figures(aggregator, "otel-pool/default")
    assert pool == {
        "used": during["pool_size"] - during.get("pool_available", 0),
        "idle": during.get("pool_available", 0),
        "max": during["pool_max"],
        "idle.min": during["pool_min"],
        "pending_requests": during["requests_waiting"],
    }
    assert pool["used"] == 3 and pool["pending_requests"] == 2 and pool["max"] == 3 and pool["idle.min"] == 2
    assert metric_values(aggregator, "db.client.connections.usage") == []  # current alone: no legacy name

    aggregator.reset()
    dd_run_check(check)
    check.cancel()
    after = stats(app)
    pool = pool_figures(aggregator, "otel-pool/default")
    gave_up = after.get("requests_errors", 0) - before.get("requests_errors", 0)
    assert gave_up == 2
    assert pool == {
        "used": after["pool_size"] - after.get("pool_available", 0),
        "idle": after.get("pool_available", 0),
        "max": 3,
        "idle.min": 2,
        "pending_requests": 0,
        "timeouts": gave_up,
    }
