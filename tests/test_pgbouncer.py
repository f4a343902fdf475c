"""The PgBouncer side against a real PgBouncer 1.18 in front of the suite's PostgreSQL."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from datadog_checks.base import AgentCheck
from psycopg.rows import dict_row

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.sandbox import Sandbox

from .conftest import metric_values, one_value, statements_of_two_runs, timed_critical_run


@pytest.fixture(scope="module")
def pools(sandbox):
    """Two extra pools: `tiny` (transaction mode, one server connection) and `sess` (session mode)."""
    port = sandbox.postgres.port
    sandbox.pgbouncer.databases["tiny"] = f"host=127.0.0.1 port={port} dbname=appdb pool_size=1"
    sandbox.pgbouncer.databases["sess"] = (
        f"host=127.0.0.1 port={port} dbname=appdb pool_size=3 pool_mode=session max_db_connections=3"
    )
    sandbox.pgbouncer.reload()
    yield sandbox
    del sandbox.pgbouncer.databases["tiny"], sandbox.pgbouncer.databases["sess"]
    sandbox.pgbouncer.reload()


def _through_pgbouncer(clients, sandbox, dbname: str, count: int) -> list[psycopg.Connection]:
    return clients.many(count, app="web", dbname=dbname, port=sandbox.pgbouncer.port, prepare_threshold=None)


def _pool(aggregator, column: str, db: str) -> float:
    return one_value(aggregator, f"django_db.pgbouncer.pools.{column}", f"pgbouncer_db:{db}")


def test_waiting_clients_and_saturated_pool(aggregator, dd_run_check, pools, clients):
    holder, waiter = _through_pgbouncer(clients, pools, "tiny", 2)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")  # holds the only server connection of the pool
    thread = threading.Thread(target=lambda: waiter.execute("SELECT 1"), daemon=True)
    thread.start()
    time.sleep(1.2)  # maxwait counts whole seconds plus microseconds
    check = DjangoDbCheck("django_db", {}, [{"pgbouncer": pools.pgbouncer.instance("datadog")}])
    dd_run_check(check)
    assert _pool(aggregator, "cl_active", "tiny") == 1
    assert _pool(aggregator, "cl_waiting", "tiny") == 1
    assert _pool(aggregator, "sv_active", "tiny") == 1
    assert _pool(aggregator, "sv_idle", "tiny") == 0
    assert _pool(aggregator, "maxwait", "tiny") >= 1.0
    assert _pool(aggregator, "server_utilization", "tiny") == 1.0
    assert (
        one_value(aggregator, "django_db.pgbouncer.pools.cl_waiting", "pgbouncer_db:tiny", "pool_mode:transaction") == 1
    )
    holder.execute("COMMIT")
    thread.join(5)
    assert not thread.is_alive()
    aggregator.reset()
    dd_run_check(check)
    assert _pool(aggregator, "cl_waiting", "tiny") == 0
    assert _pool(aggregator, "maxwait", "tiny") == 0


def test_database_limit_is_sent_only_when_there_is_one(aggregator, dd_run_check, pools):
    check = DjangoDbCheck("django_db", {}, [{"pgbouncer": pools.pgbouncer.instance("datadog")}])
    dd_run_check(check)
    check.cancel()
    assert one_value(aggregator, "django_db.pgbouncer.databases.max_connections", "pgbouncer_db:sess") == 3
    # No max_db_connections anywhere means no limit: no series, rather than a 0 that reads as "none allowed".
    assert metric_values(aggregator, "django_db.pgbouncer.databases.max_connections", "pgbouncer_db:tiny") == []
    # What each database holds (its pools' sv_* say it) and its settings are opt-in.
    assert metric_values(aggregator, "django_db.pgbouncer.databases.current_connections") == []
    assert metric_values(aggregator, "django_db.pgbouncer.databases.pool_size") == []


def test_database_settings_with_their_group(aggregator, dd_run_check, pools):
    instance = {"pgbouncer": pools.pgbouncer.instance("datadog"), "extra_metrics": ["pgbouncer_databases"]}
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)
    check.cancel()
    assert one_value(aggregator, "django_db.pgbouncer.databases.pool_size", "pgbouncer_db:tiny") == 1
    assert one_value(aggregator, "django_db.pgbouncer.databases.pool_size", "pgbouncer_db:sess") == 3
    assert one_value(aggregator, "django_db.pgbouncer.databases.paused", "pgbouncer_db:tiny") == 0
    assert one_value(aggregator, "django_db.pgbouncer.databases.current_connections", "pgbouncer_db:tiny") >= 0
    assert metric_values(aggregator, "django_db.pgbouncer.lists.used_clients") == []


def test_session_mode_pins_server_connections(aggregator, dd_run_check, pools, clients):
    first, second = _through_pgbouncer(clients, pools, "sess", 2)
    first.execute("SELECT 1")
    second.execute("SELECT 1")
    check = DjangoDbCheck("django_db", {}, [{"pgbouncer": pools.pgbouncer.instance("datadog")}])
    dd_run_check(check)
    tags = ("pgbouncer_db:sess", "pool_mode:session")
    assert one_value(aggregator, "django_db.pgbouncer.pools.cl_active", *tags) == 2
    assert one_value(aggregator, "django_db.pgbouncer.pools.sv_active", *tags) == 2
    assert one_value(aggregator, "django_db.pgbouncer.pools.server_utilization", *tags) == pytest.approx(2 / 3)
    second.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        aggregator.reset()
        dd_run_check(check)
        if one_value(aggregator, "django_db.pgbouncer.pools.sv_idle", *tags) == 1:
            break
        time.sleep(0.1)
    assert one_value(aggregator, "django_db.pgbouncer.pools.sv_active", *tags) == 1
    assert one_value(aggregator, "django_db.pgbouncer.pools.sv_idle", *tags) == 1


def test_clients_against_max_client_conn(aggregator, dd_run_check, sandbox, clients):
    _through_pgbouncer(clients, sandbox, "appdb", 4)
    instance = {"pgbouncer": sandbox.pgbouncer.instance("datadog"), "extra_metrics": ["pgbouncer_lists"]}
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)
    # Four application clients and the check's own console connection.
    assert one_value(aggregator, "django_db.pgbouncer.clients") == 5
    assert one_value(aggregator, "django_db.pgbouncer.lists.used_clients") == 5
    assert one_value(aggregator, "django_db.pgbouncer.lists.pools") >= 1
    assert one_value(aggregator, "django_db.pgbouncer.max_client_conn") == 100
    assert one_value(aggregator, "django_db.pgbouncer.client_utilization") == pytest.approx(0.05)
    assert metric_values(aggregator, "django_db.pgbouncer.pools.cl_active", "pgbouncer_db:pgbouncer") == []
    assert metric_values(aggregator, "django_db.pgbouncer.stats.queries", "pgbouncer_db:pgbouncer") == []


def test_stats_after_traffic(aggregator, dd_run_check, sandbox, clients):
    (conn,) = _through_pgbouncer(clients, sandbox, "otherdb", 1)
    conn.execute("SELECT 1")
    instance = {"pgbouncer": sandbox.pgbouncer.instance("datadog"), "extra_metrics": ["pgbouncer_stats"]}
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)
    first = {
        name: one_value(aggregator, f"django_db.pgbouncer.stats.{name}", "pgbouncer_db:otherdb")
        for name in ("transactions", "queries", "xact_time", "bytes_sent")
    }
    for _ in range(5):
        conn.execute("SELECT pg_sleep(0.05)")
    aggregator.reset()
    dd_run_check(check)
    second = {
        name: one_value(aggregator, f"django_db.pgbouncer.stats.{name}", "pgbouncer_db:otherdb")
        for name in ("transactions", "queries", "xact_time", "bytes_sent")
    }
    assert second["transactions"] - first["transactions"] == 5
    assert second["queries"] - first["queries"] == 5
    assert 0.25 <= second["xact_time"] - first["xact_time"] < 5  # seconds, not microseconds
    assert second["bytes_sent"] > first["bytes_sent"]
    for metric in aggregator.metrics("django_db.pgbouncer.stats.transactions"):
        assert metric.type == aggregator.RATE


def test_version_metadata(dd_run_check, datadog_agent, sandbox):
    check = DjangoDbCheck("django_db", {}, [{"pgbouncer": sandbox.pgbouncer.instance("datadog")}])
    check.check_id = "test:pgbouncer"
    dd_run_check(check)
    datadog_agent.assert_metadata(
        "test:pgbouncer", {"version.raw": "1.18.0", "version.major": "1", "version.minor": "18"}
    )


@pytest.fixture
def own_sandbox():
    with Sandbox(max_connections=30) as box:
        yield box


def test_each_side_reports_while_the_other_is_down(aggregator, dd_run_check, own_sandbox):
    check = DjangoDbCheck("django_db", {}, [own_sandbox.instance()])
    own_sandbox.pgbouncer.stop()
    dd_run_check(check)
    aggregator.assert_service_check("django_db.pgbouncer.can_connect", AgentCheck.CRITICAL)
    aggregator.assert_service_check("django_db.postgres.can_connect", AgentCheck.OK)
    assert metric_values(aggregator, "django_db.postgres.max_connections") == [30]
    message = aggregator.service_checks("django_db.pgbouncer.can_connect")[0].message
    assert "connection_refused" in message and Sandbox.MONITOR_PASSWORD not in message
    # The error is counted once, on the server it came from.
    (error,) = aggregator.metrics("django_db.errors")
    assert f"pgbouncer_server:127.0.0.1:{own_sandbox.pgbouncer.port}" in error.tags
    assert {"signature:connection_refused", "source:pgbouncer"} <= set(error.tags)
    assert not any(tag.startswith("postgres_server:") for tag in error.tags)

    own_sandbox.pgbouncer.start()
    own_sandbox.postgres.stop()
    aggregator.reset()
    dd_run_check(check)
    aggregator.assert_service_check("django_db.postgres.can_connect", AgentCheck.CRITICAL)
    aggregator.assert_service_check("django_db.pgbouncer.can_connect", AgentCheck.OK)
    assert metric_values(aggregator, "django_db.pgbouncer.max_client_conn") == [100]
    # The loss of the kept connection and the refusal of a new one: each once, on the server they came from.
    errors = aggregator.metrics("django_db.errors")
    assert len(errors) == 2
    for error in errors:
        assert f"postgres_server:127.0.0.1:{own_sandbox.postgres.port}" in error.tags
        assert "source:postgres" in error.tags
    assert any("signature:connection_refused" in error.tags for error in errors)
    check.cancel()


def test_hung_pgbouncer_gives_critical_within_the_timeouts(aggregator, dd_run_check, own_sandbox):
    instance = {"pgbouncer": {**own_sandbox.pgbouncer.instance("datadog"), "query_timeout": 1, "connect_timeout": 2}}
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)  # the console connection is open
    aggregator.assert_service_check("django_db.pgbouncer.can_connect", AgentCheck.OK)
    own_sandbox.pgbouncer.pause()
    try:
        for bound in (1, 2):  # a query on the open connection, then a new connection
            elapsed, message = timed_critical_run(aggregator, dd_run_check, check, "django_db.pgbouncer.can_connect")
            assert "connect_timeout" in message, message
            assert elapsed < bound + 1.5, elapsed
    finally:
        own_sandbox.pgbouncer.resume()
    aggregator.reset()
    dd_run_check(check)
    aggregator.assert_service_check("django_db.pgbouncer.can_connect", AgentCheck.OK)
    check.cancel()


def test_no_connection_leaks_across_runs_and_failures(dd_run_check, own_sandbox):
    check = DjangoDbCheck("django_db", {}, [own_sandbox.instance()])
    for _ in range(3):
        dd_run_check(check)
    own_sandbox.pgbouncer.stop()
    dd_run_check(check)
    own_sandbox.pgbouncer.start()
    for _ in range(3):
        dd_run_check(check)
    watcher = psycopg.connect(own_sandbox.postgres.dsn(), autocommit=True)
    try:
        own = watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'datadog-django-db'"
        ).fetchone()[0]
        assert own == 1
    finally:
        watcher.close()
    admin = psycopg.connect(
        host="127.0.0.1",
        port=own_sandbox.pgbouncer.port,
        user="postgres",
        password=own_sandbox.pgbouncer.users["postgres"],
        dbname="pgbouncer",
        autocommit=True,
        cursor_factory=psycopg.ClientCursor,
    )
    try:
        rows = admin.execute("SHOW CLIENTS").fetchall()
        assert len([r for r in rows if "datadog" in r]) == 1
    finally:
        admin.close()
    check.cancel()
    assert check.postgres.conn is None and check.pgbouncer.conn is None


def test_records_read_from_the_cursor_match_the_rows_and_allow_nested_passes(sandbox, clients, monkeypatch):
    """The source reads the console's rows where libpq keeps them, a few at a time on each pass: the
    records are those of the same rows fetched whole, and passes over one result may nest."""
    from datadog_checks.django_db import config
    from datadog_checks.django_db.sources.pgbouncer import PER_RUN, CursorRows, PgBouncerSource, Result, snapshot_of

    monkeypatch.setattr(CursorRows, "CHUNK", 1)  # a pass inside another moves the cursor at every row
    for dbname in ("appdb", "otherdb"):
        _through_pgbouncer(clients, sandbox, dbname, 1)[0].execute("SELECT 1")
    settings = config.parse({"pgbouncer": sandbox.pgbouncer.instance("datadog")})
    source = PgBouncerSource(settings.pgbouncer)
    try:
        snapshot = source.snapshot()
        fetched = {name: source.conn.execute("SHOW " + name) for name in (*PER_RUN, "DATABASES")}
        whole = {
            name: Result([c.name for c in cursor.description], cursor.fetchall()) for name, cursor in fetched.items()
        }
        plain = snapshot_of(whole, snapshot.config, snapshot.version, False)
        for field in ("pools", "databases", "stats"):
            records = list(getattr(snapshot, field))
            assert records and records == list(getattr(snapshot, field))  # read again, the same
            assert [r._replace(**_volatile(r)) for r in records] == [
                r._replace(**_volatile(r)) for r in getattr(plain, field)
            ]
        names = [p.db for p in snapshot.pools]
        assert {"appdb", "otherdb"} <= set(names) and "pgbouncer" not in names
        assert [(a.db, b.db) for a in snapshot.pools for b in snapshot.pools] == [(a, b) for a in names for b in names]
        # The names read from their cells alone are those of the records, from libpq's rows as from whole ones.
        for read in (snapshot, plain):
            assert read.names is not None
            assert list(read.names.pool_dbs) == names and list(read.names.pool_users) == [p.user for p in read.pools]
            assert list(read.names.databases) == [d.name for d in read.databases]
            assert list(read.names.stats_dbs) == [s.db for s in read.stats]
    finally:
        source.close()


def _volatile(record) -> dict:
    """Counters that move between two reads of the console (its own queries count in them)."""
    return {name: None for name in record._fields if name in ("cl_active", "sv_active", "sv_idle", "sv_used",
            "current_connections", "transactions", "queries", "bytes_received", "bytes_sent", "xact_time",
            "query_time", "wait_time", "maxwait")}  # fmt: skip


def test_a_run_after_the_first_asks_three_questions_on_the_same_connection(dd_run_check, sandbox):
    check = DjangoDbCheck("django_db", {}, [{"pgbouncer": sandbox.pgbouncer.instance("datadog")}])
    asked = statements_of_two_runs(dd_run_check, check, "pgbouncer")
    assert asked == ["SHOW POOLS", "SHOW STATS", "SHOW CLIENTS"] * 2


def test_the_groups_that_need_them_read_databases_and_lists_every_run(dd_run_check, sandbox):
    groups = ["pgbouncer_databases", "pgbouncer_lists"]
    instance = {"pgbouncer": sandbox.pgbouncer.instance("datadog"), "extra_metrics": groups}
    asked = statements_of_two_runs(dd_run_check, DjangoDbCheck("django_db", {}, [instance]), "pgbouncer")
    assert asked == ["SHOW POOLS", "SHOW STATS", "SHOW CLIENTS", "SHOW DATABASES", "SHOW LISTS"] * 2


def test_settings_are_read_again_now_and_then_and_a_new_database_at_once(aggregator, dd_run_check, sandbox, clients):
    """CONFIG, VERSION and DATABASES change on a RELOAD or a new database only: read again every
    SETTINGS_SECONDS, and DATABASES at once when a pool names a database it did not list. PgBouncer does not
    always list an auto-database (never once its pool is unused) but lists its pool: not read again for."""
    from datadog_checks.django_db.sources import pgbouncer as source_module
    from datadog_checks.django_db.sources.pgbouncer import Names

    check = DjangoDbCheck("django_db", {}, [{"pgbouncer": sandbox.pgbouncer.instance("datadog")}])
    dd_run_check(check)
    source = check.pgbouncer
    conn = source.conn
    asked: list[str] = []
    execute = psycopg.Cursor.execute

    def counted(cursor, query, *args, **kwargs):
        if cursor.connection is conn:
            asked.append(str(query))
        return execute(cursor, query, *args, **kwargs)

    def listed(what: str, column: str) -> set[str]:
        return {row[column] for row in conn.cursor(row_factory=dict_row).execute("SHOW " + what)}

    def until(done) -> None:
        give_up = time.monotonic() + 10
        while not done() and time.monotonic() < give_up:
            time.sleep(0.1)

    # A database a RELOAD adds: its pool appears with its first client, and DATABASES is read.
    added = f"added_{time.monotonic_ns() % 10**9}"
    sandbox.pgbouncer.databases[added] = f"host=127.0.0.1 port={sandbox.postgres.port} dbname=appdb"
    sandbox.pgbouncer.reload()
    try:
        until(lambda: added in listed("DATABASES", "name"))
        _through_pgbouncer(clients, sandbox, added, 1)  # the fixture closes it
        # One the `*` entry makes on a client's first connection (PostgreSQL refuses this one): PgBouncer stops listing
        # it within a second, its pool unused, and keeps its pool.
        fresh = f"fresh_{time.monotonic_ns() % 10**9}"
        with pytest.raises(psycopg.OperationalError):
            _through_pgbouncer(clients, sandbox, fresh, 1)
        until(lambda: fresh not in listed("DATABASES", "name"))
        assert fresh not in listed("DATABASES", "name") and fresh in listed("POOLS", "database")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(psycopg.Cursor, "execute", counted)
            dd_run_check(check)
            assert "SHOW DATABASES" in asked and added in set(Names(source.databases, "name"))
            asked.clear()
            dd_run_check(check)
            assert asked == ["SHOW POOLS", "SHOW STATS", "SHOW CLIENTS"]
            # A RELOAD that changes max_client_conn is seen once SETTINGS_SECONDS have gone.
            sandbox.pgbouncer.settings["max_client_conn"] = 77
            sandbox.pgbouncer.reload()
            patch.setattr(source_module, "SETTINGS_SECONDS", 0.0)
            asked.clear()
            aggregator.reset()
            dd_run_check(check)
    finally:
        check.cancel()
        del sandbox.pgbouncer.databases[added]
        sandbox.pgbouncer.settings["max_client_conn"] = 100
        sandbox.pgbouncer.reload()
    assert asked[:2] == ["SHOW CONFIG", "SHOW VERSION"] and "SHOW DATABASES" in asked
    assert one_value(aggregator, "django_db.pgbouncer.max_client_conn") == 77
