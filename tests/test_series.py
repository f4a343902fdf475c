"""What a run costs: distinct series (metric name and tag values), each billed as a custom metric.

Against real servers of its own, so that nothing another test left open changes the count: the small
stack of the README (PostgreSQL with 20 connections from 3 applications, PgBouncer with 3 pools), and
PgBouncer with many pools. The README's figures are the formulas below.
"""

from __future__ import annotations

import os
import time
import tracemalloc
from collections.abc import Iterator

import psycopg
import pytest

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.config import METRIC_GROUPS
from django_db_tools.sandbox import SUPERUSER, SUPERUSER_PASSWORD, Sandbox

os.environ.setdefault("DDEV_SKIP_GENERIC_TAGS_CHECK", "true")

PASSWORD = "series-secret"
APPS = {"web": 10, "worker": 6, "cron": 4}
POOLS = ("appdb", "postgres", "reports")  # the third an alias of appdb
MANY = 40


@pytest.fixture(scope="module")
def stack() -> Iterator[Sandbox]:
    with Sandbox(max_connections=150, max_client_conn=200, default_pool_size=2) as box:
        box.psql(f"CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'")
        box.psql("CREATE DATABASE appdb OWNER app")
        box.pgbouncer.users["app"] = PASSWORD
        box.pgbouncer.databases["reports"] = f"host=127.0.0.1 port={box.postgres.port} dbname=appdb"
        box.pgbouncer.reload()
        yield box


def _connect(box: Sandbox, port: int, dbname: str, app: str) -> psycopg.Connection:
    return psycopg.connect(
        host="127.0.0.1", port=port, user="app", password=PASSWORD, dbname=dbname, application_name=app,
        autocommit=True, prepare_threshold=None, connect_timeout=5,
    )  # fmt: skip


def series(aggregator, prefix: str = "") -> set[tuple[str, tuple[str, ...]]]:
    return {
        (name, tuple(sorted(m.tags)))
        for name in aggregator.metric_names
        if name.startswith(prefix)
        for m in aggregator.metrics(name)
    }


def expected_postgres(found: set[tuple[str, tuple[str, ...]]]) -> int:
    """The README's count for PostgreSQL: 4 per server, 4 per database (sessions), per application
    (db, user, app) one per state it is in plus one (leaked), per (db, app) four (lock waits and the
    three ages), and db.client.connections.usage per database and used/idle."""
    tags = [dict(t.split(":", 1) for t in tags) for name, tags in found if name == "django_db.postgres.connections"]
    apps = {(t["db"], t["user"], t["app"]) for t in tags}
    per_db_app = {(db, app) for db, _, app in apps}
    databases = {dict(t.split(":", 1) for t in tags)["db"] for name, tags in found if name.endswith("sessions.opened")}
    otel = {tags for name, tags in found if name == "db.client.connections.usage"}
    return 4 + 4 * len(databases) + len(tags) + len(apps) + 4 * len(per_db_app) + len(otel)


def _console(box: Sandbox, command: str) -> list[dict]:
    with psycopg.connect(
        host="127.0.0.1", port=box.pgbouncer.port, user=SUPERUSER, password=SUPERUSER_PASSWORD, dbname="pgbouncer",
        autocommit=True, cursor_factory=psycopg.ClientCursor, connect_timeout=5,
    ) as conn:  # fmt: skip
        cursor = conn.execute(command)
        names = [d.name for d in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _pgbouncer_settled(box: Sandbox, pools: tuple[str, ...], timeout: float = 15) -> None:
    """Wait until PgBouncer lists what the count is made of: each pool in SHOW POOLS, SHOW STATS and SHOW
    DATABASES, and each pool's client of `web`, so that no row a run reads is still on its way."""
    deadline = time.monotonic() + timeout
    while True:
        listed = {
            "pools": {r["database"] for r in _console(box, "SHOW POOLS") if r["user"] == "app"},
            "stats": {r["database"] for r in _console(box, "SHOW STATS")},
            "databases": {r["name"] for r in _console(box, "SHOW DATABASES")},
            "clients": {r["database"] for r in _console(box, "SHOW CLIENTS") if r.get("application_name") == "web"},
        }
        if all(set(pools) <= names for names in listed.values()):
            return
        assert time.monotonic() < deadline, listed
        time.sleep(0.2)


def test_the_small_stack_sends_at_most_80_series(aggregator, stack):
    held = [_connect(stack, stack.postgres.port, "appdb", app) for app, count in APPS.items() for _ in range(count)]
    held[0].execute("BEGIN")
    held[0].execute("SELECT 1")  # one web connection idle in a transaction
    through = [_connect(stack, stack.pgbouncer.port, db, "web") for db in POOLS]
    for conn in through:
        conn.execute("SELECT 1")
    _pgbouncer_settled(stack, POOLS)
    check = DjangoDbCheck("django_db", {}, [stack.instance()])
    try:
        check.check(None)
        aggregator.reset()
        check.check(None)  # the second run: rates and counts as the Agent sends them from then on
        found = series(aggregator)
    finally:
        check.cancel()
        for conn in held + through:
            conn.close()
    findings = {s for s in found if s[0] == "django_db.finding"}
    postgres = {s for s in found if not s[0].startswith("django_db.pgbouncer.")} - findings
    pgbouncer = found - postgres - findings
    print(f"\n{len(found)} series: PostgreSQL {len(postgres)}, PgBouncer {len(pgbouncer)}, findings {len(findings)}")
    assert len(found) <= 80
    assert len(postgres) == expected_postgres(postgres)
    # One per active finding and subject: here the application's role on each of its databases, without
    # statement_timeout (config_alignment); the transaction left idle for a moment is no finding yet.
    subjects = {
        (t["finding"], t["user"], t["db"]) for t in (dict(x.split(":", 1) for x in tags) for _, tags in findings)
    }
    assert subjects == {("timeouts_unset", "app", db) for db in {"appdb", *POOLS}} & subjects
    assert len(subjects) == len(findings) >= 1
    # per pool 9; per application at PgBouncer (pgbouncer_db, user, app): 1 per state its clients are in,
    # 1 leaked_clients; here each pool has one idle client of app=web
    assert len(pgbouncer) == 9 * len(POOLS) + 3 + 2 * len(POOLS)
    assert not [s for s in found if any(t.startswith("db:template") for t in s[1])]
    assert not {name for name, _ in found} & {"django_db.connections.usage", "django_db.pgbouncer.lists.pools"}


def test_every_group_adds_series_only_when_asked_for(aggregator, stack):
    conn = _connect(stack, stack.pgbouncer.port, "appdb", "web")
    conn.execute("SELECT 1")
    counts = {}
    try:
        for extra in ([], list(METRIC_GROUPS)):
            check = DjangoDbCheck("django_db", {}, [{**stack.instance(), "extra_metrics": extra}])
            aggregator.reset()
            check.check(None)
            check.cancel()
            counts[len(extra)] = {name for name, _ in series(aggregator)}
    finally:
        conn.close()
    added = counts[len(METRIC_GROUPS)] - counts[0]
    assert {"django_db.connections.usage", "django_db.pgbouncer.lists.pools", "django_db.pgbouncer.stats.queries",
            "django_db.pgbouncer.pools.sv_login", "django_db.pgbouncer.databases.pool_size"} <= added  # fmt: skip
    assert counts[0] <= counts[len(METRIC_GROUPS)]


def test_current_opentelemetry_names_add_what_the_readme_says(aggregator, stack):
    """`otel_semconv`: 3 series for PostgreSQL, one pool of the whole server (used, idle, max) and 4 per PgBouncer
    pool without a minimum (used, idle, max, pending_requests) under the current names; legacy sends none of
    them, both adds them."""
    held = [_connect(stack, stack.postgres.port, "appdb", app) for app in APPS]
    through = [_connect(stack, stack.pgbouncer.port, db, "web") for db in POOLS]
    for conn in through:
        conn.execute("SELECT 1")
    found = {}
    try:
        for option in ("legacy", "current", "both"):
            check = DjangoDbCheck("django_db", {}, [{**stack.instance(), "otel_semconv": option}])
            check.check(None)
            aggregator.reset()
            check.check(None)
            check.cancel()
            found[option] = series(aggregator)
    finally:
        for conn in held + through:
            conn.close()
    legacy, current, both = found["legacy"], found["current"], found["both"]
    new = {s for s in both if s[0].startswith("db.client.connection.")}
    usage = {s for s in legacy if s[0] == "db.client.connections.usage"}
    connections = [tags for name, tags in legacy if name == "django_db.postgres.connections"]
    databases = {dict(t.split(":", 1) for t in tags)["db"] for tags in connections}
    print(f"\nseries: legacy {len(legacy)}, current {len(current)}, both {len(both)} ({len(databases)} databases)")
    assert usage and both == legacy | new and current == (legacy - usage) | new
    assert len(databases) > 1 and len(new) == 3 + 4 * len(POOLS)


def _peak_memory(check: DjangoDbCheck) -> int:
    """Bytes of Python memory a run takes at its peak, metrics handed to a no-op as the Agent would take them."""
    check.check(None)  # warm: the connection and what is read on connecting
    tracemalloc.start()
    try:
        check.check(None)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_at_most_10_series_per_pgbouncer_pool_and_memory_that_does_not_grow_with_them(aggregator, stack):
    def noop(*args: object) -> None:
        pass

    few = DjangoDbCheck("django_db", {}, [{"pgbouncer": stack.pgbouncer.instance(Sandbox.MONITOR_USER)}])
    few._submitters = dict.fromkeys(few._submitters, noop)
    peak_few = _peak_memory(few)
    few.cancel()
    names = [f"alias{i:03d}" for i in range(MANY)]
    for name in names:
        stack.pgbouncer.databases[name] = f"host=127.0.0.1 port={stack.postgres.port} dbname=postgres"
    stack.pgbouncer.reload()
    try:
        for name in names:
            with psycopg.connect(
                host="127.0.0.1", port=stack.pgbouncer.port, user=SUPERUSER, password=SUPERUSER_PASSWORD,
                dbname=name, autocommit=True, prepare_threshold=None, connect_timeout=5,
            ) as conn:  # fmt: skip
                conn.execute("SELECT 1")
        check = DjangoDbCheck("django_db", {}, [{"pgbouncer": stack.pgbouncer.instance(Sandbox.MONITOR_USER)}])
        aggregator.reset()
        check.check(None)
        found = series(aggregator, "django_db.pgbouncer.")
        check._submitters = dict.fromkeys(check._submitters, noop)
        peak_many = _peak_memory(check)
        check.cancel()
    finally:
        for name in names:
            del stack.pgbouncer.databases[name]
        stack.pgbouncer.reload()
    pools = {t for _, tags in found for t in tags if t.startswith("pgbouncer_db:")}
    assert {f"pgbouncer_db:{name}" for name in names} <= pools
    print(f"\n{len(found)} PgBouncer series for {len(pools)} pools: {(len(found) - 3) / len(pools):.1f} a pool")
    # Nine a pool (six of SHOW POOLS, current_connections, two rates) and three a server.
    assert len(found) == 9 * len(pools) + 3
    assert (len(found) - 3) / len(pools) <= 10
    # The console's rows are read a few at a time and each metric is submitted as it is made.
    print(f"peak memory of a run: {peak_few / 1024:.1f} KiB with 3 pools, {peak_many / 1024:.1f} KiB with {len(pools)}")
    assert peak_many <= 2 * peak_few
