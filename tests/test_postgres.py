"""The PostgreSQL side against a real PostgreSQL 15, with connections in known states."""

from __future__ import annotations

import tempfile
import threading
import time

import psycopg
import pytest
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.sandbox import Sandbox

from .conftest import APP_PASSWORD, metric_values, one_value, statements_of_two_runs, timed_critical_run

# Connections opened straight to PostgreSQL; PgBouncer's server connections use other names.
APP = "direct"


def _in_background(conn: psycopg.Connection, sql: str) -> threading.Thread:
    def run() -> None:
        try:
            conn.execute(sql)
        except psycopg.Error:
            pass  # cancelled when the test ends

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_for(conn: psycopg.Connection, sql: str, expected: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if conn.execute(sql).fetchone()[0] == expected:
            return
        time.sleep(0.05)
    raise AssertionError(f"{sql} never gave {expected}")


@pytest.fixture
def known_states(sandbox, clients):
    """4 idle, 2 active, 2 idle in transaction, 1 aborted, 1 lock waiter (app=direct), 1 leaked (app=leaky)."""
    leaky = clients.connect(app="leaky")
    leaky.execute("SELECT 1")
    started = time.monotonic()
    idle = clients.many(4, app=APP)
    for conn in clients.many(2, app=APP):
        _in_background(conn, "SELECT pg_sleep(60)")
    for conn in clients.many(2, app=APP):
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
    aborted = clients.connect(app=APP)
    aborted.execute("BEGIN")
    with pytest.raises(psycopg.errors.DivisionByZero):
        aborted.execute("SELECT 1/0")
    holder = clients.connect(app="locker")
    holder.execute("BEGIN")
    holder.execute("LOCK TABLE items")
    waiter = clients.connect(app=APP)
    _in_background(waiter, "SELECT * FROM items")
    watcher = psycopg.connect(sandbox.postgres.dsn(), autocommit=True)
    try:
        _wait_for(
            watcher, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'direct' AND state = 'active'", 3
        )
        _wait_for(watcher, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'", 1)
    finally:
        watcher.close()
    time.sleep(max(0.0, 2.5 - (time.monotonic() - started)))
    for conn in idle:
        conn.execute("SELECT 1")  # fresh: idle for well under the leak threshold
    return {"leak_idle_seconds": 2}


def test_counts_each_state_exactly(aggregator, dd_run_check, pg_instance, known_states):
    check = DjangoDbCheck("django_db", {}, [{**pg_instance, **known_states, "extra_metrics": ["connections_usage"]}])
    dd_run_check(check)
    web = ("db:appdb", "user:app", f"app:{APP}")
    assert one_value(aggregator, "django_db.postgres.connections", "state:idle", *web) == 4
    assert one_value(aggregator, "django_db.postgres.connections", "state:active", *web) == 3
    assert one_value(aggregator, "django_db.postgres.connections", "state:idle_in_transaction", *web) == 2
    assert one_value(aggregator, "django_db.postgres.connections", "state:idle_in_transaction_aborted", *web) == 1
    assert one_value(aggregator, "django_db.postgres.connections", "state:idle_in_transaction", "app:locker") == 1
    assert one_value(aggregator, "django_db.postgres.waiting_on_lock", "db:appdb", f"app:{APP}") == 1
    assert metric_values(aggregator, "django_db.postgres.leaked_connections", *web) == []  # a zero is not sent
    assert one_value(aggregator, "django_db.postgres.leaked_connections", "app:leaky") == 1
    assert one_value(aggregator, "django_db.postgres.idle.max_age", "app:leaky") >= 2
    assert one_value(aggregator, "django_db.postgres.idle.max_age", "db:appdb", f"app:{APP}") < 2
    assert one_value(aggregator, "django_db.postgres.idle_in_transaction.max_age", f"app:{APP}") > 0
    assert one_value(aggregator, "django_db.postgres.active.max_duration", f"app:{APP}") > 0
    assert one_value(aggregator, "django_db.connections.usage", "state:idle", "db:appdb", f"app:{APP}") == 4
    assert one_value(aggregator, "django_db.connections.usage", "state:used", "db:appdb", f"app:{APP}") == 6
    pool = f"pool.name:127.0.0.1:{pg_instance['postgres']['port']}/appdb"
    assert one_value(aggregator, "db.client.connections.usage", "state:used", pool) >= 7
    # The check's own connection (application_name datadog-django-db) is never counted.
    assert metric_values(aggregator, "django_db.postgres.connections", "app:datadog-django-db") == []
    aggregator.assert_service_check(
        "django_db.postgres.can_connect",
        AgentCheck.OK,
        tags=[f"postgres_server:127.0.0.1:{pg_instance['postgres']['port']}", "env_name:test"],
    )


def test_utilisation_counts_client_backends_against_usable_slots(
    aggregator, dd_run_check, sandbox, pg_instance, clients
):
    watcher = clients.connect(app="watcher", user="postgres", dbname="postgres")
    clients.many(5, app=APP)
    check = DjangoDbCheck("django_db", {}, [pg_instance])
    dd_run_check(check)
    backends = watcher.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
    ).fetchone()[0]
    usable = 100 - 3  # max_connections - superuser_reserved_connections on PostgreSQL 15
    assert one_value(aggregator, "django_db.postgres.max_connections") == 100
    assert one_value(aggregator, "django_db.postgres.reserved_connections") == 3
    assert one_value(aggregator, "django_db.postgres.connection_utilization") == pytest.approx(backends / usable)
    assert one_value(aggregator, "django_db.postgres.connections_available") == usable - backends


def test_role_without_pg_monitor_sees_unknown_state(aggregator, dd_run_check, sandbox, clients):
    clients.many(3, app=APP)
    instance = {"postgres": sandbox.postgres.instance("plain", APP_PASSWORD)}
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)
    # Another role's backends: the state is hidden, the row is still counted.
    assert one_value(aggregator, "django_db.postgres.connections", "state:unknown", "user:app", f"app:{APP}") == 3
    assert metric_values(aggregator, "django_db.postgres.connections", "state:idle", f"app:{APP}") == []


def test_filters_group_by_and_folding(aggregator, dd_run_check, pg_instance, clients, caplog):
    for index in range(4):
        clients.many(index + 1, app=f"worker-{index}")
    clients.many(2, app=APP, dbname="otherdb")
    instance = {
        **pg_instance,
        "applications": {"include": ["^worker-", "^direct$"], "exclude": ["-0$"]},
        "databases": {"exclude": ["^otherdb$"]},
        "group_by": ["app"],
        "max_tag_values": 2,
    }
    caplog.set_level("DEBUG")
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)
    # worker-3 (4 conns) and worker-2 (3) kept; worker-1 folds into other; worker-0 and otherdb filtered out.
    assert one_value(aggregator, "django_db.postgres.connections", "state:idle", "app:worker-3") == 4
    assert one_value(aggregator, "django_db.postgres.connections", "state:idle", "app:worker-2") == 3
    assert one_value(aggregator, "django_db.postgres.connections", "state:idle", "app:other") == 2
    assert metric_values(aggregator, "django_db.postgres.connections", "app:worker-0") == []
    assert metric_values(aggregator, "django_db.postgres.connections", f"app:{APP}") == []
    for metric in aggregator.metrics("django_db.postgres.connections"):
        assert not any(t.startswith(("db:", "user:")) for t in metric.tags)
    assert "folded into `other`: worker-1" in caplog.text


def test_client_addr_is_opt_in(aggregator, dd_run_check, pg_instance, clients):
    clients.many(2, app=APP)
    check = DjangoDbCheck("django_db", {}, [{**pg_instance, "group_by": ["app", "client_addr"]}])
    dd_run_check(check)
    assert one_value(aggregator, "django_db.postgres.connections", f"app:{APP}", "client_addr:127.0.0.1") == 2


def test_sessions_opened_and_killed_between_runs(aggregator, dd_run_check, sandbox, pg_instance, clients):
    check = DjangoDbCheck("django_db", {}, [pg_instance])
    dd_run_check(check)
    opened = one_value(aggregator, "django_db.postgres.sessions.opened", "db:appdb")
    killed = one_value(aggregator, "django_db.postgres.sessions.killed", "db:appdb")
    victims = clients.many(3, app="to-be-killed")
    sandbox.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'to-be-killed'")
    for victim in victims:  # each backend has exited, and reported its end, once its client sees the socket close
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
    aggregator.reset()
    dd_run_check(check)
    assert one_value(aggregator, "django_db.postgres.sessions.opened", "db:appdb") == opened + 3
    assert one_value(aggregator, "django_db.postgres.sessions.killed", "db:appdb") == killed + 3


def test_template_databases_send_no_series_but_take_their_slot(aggregator, dd_run_check, pg_instance, clients):
    check = DjangoDbCheck("django_db", {}, [pg_instance])
    dd_run_check(check)
    available = one_value(aggregator, "django_db.postgres.connections_available")
    sessions = {t for m in aggregator.metrics("django_db.postgres.sessions.opened") for t in m.tags}
    assert "db:appdb" in sessions and not {"db:template0", "db:template1"} & sessions
    clients.connect(app="on-template", user="app", dbname="template1")
    aggregator.reset()
    dd_run_check(check)
    check.cancel()
    assert one_value(aggregator, "django_db.postgres.connections_available") == available - 1
    on_templates = [
        (name, tag)
        for name in aggregator.metric_names
        for m in aggregator.metrics(name)
        for tag in m.tags
        if tag in ("db:template0", "db:template1", "app:on-template") or tag.endswith(("/template0", "/template1"))
    ]
    assert on_templates == []


def test_backends_opened_since_previous_snapshot(sandbox, pg_instance, clients):
    """The count that feeds sessions.opened below PostgreSQL 14, read on this server."""
    import logging

    from datadog_checks.django_db import config
    from datadog_checks.django_db.sources.postgres import PostgresSource

    settings = config.parse(pg_instance)
    source = PostgresSource(settings.postgres, settings.group_by, 600, logging.getLogger("test"))
    try:
        first = source.snapshot()
        assert sum(g.opened for g in first.groups) == 0
        clients.many(2, app="newcomer")
        second = source.snapshot()
        assert sum(g.opened for g in second.groups if g.app == "newcomer") == 2
        assert not second.new_connection
    finally:
        source.close()


def test_settings_are_read_once_per_connection(sandbox, pg_instance):
    import logging

    from datadog_checks.django_db import config
    from datadog_checks.django_db.sources.postgres import PostgresSource

    settings = config.parse(pg_instance)
    source = PostgresSource(settings.postgres, settings.group_by, 600, logging.getLogger("test"))
    try:
        first = source.snapshot()
        second = source.snapshot()
        assert first.new_connection and not second.new_connection
        assert second.settings is first.settings
        source.close()
        third = source.snapshot()
        assert third.new_connection and third.settings is not first.settings
        # The monitoring session bounds its own statements on the server.
        assert source.conn.execute("SHOW statement_timeout").fetchone()[0] == "5s"
        assert source.conn.info.parameter_status("application_name") == "datadog-django-db"
    finally:
        source.close()


def test_names_of_roles_and_databases_created_after_connecting(aggregator, dd_run_check, sandbox, pg_instance):
    check = DjangoDbCheck("django_db", {}, [pg_instance])
    dd_run_check(check)
    sandbox.psql("CREATE ROLE latecomer LOGIN PASSWORD 'late'")
    sandbox.psql("CREATE DATABASE latedb OWNER latecomer")
    conn = psycopg.connect(sandbox.postgres.dsn("latecomer", "late", "latedb"), application_name="late-app")
    try:
        aggregator.reset()
        dd_run_check(check)
        assert (
            one_value(aggregator, "django_db.postgres.connections", "db:latedb", "user:latecomer", "app:late-app") == 1
        )
    finally:
        conn.close()
        check.cancel()


def test_hung_backend_gives_critical_within_the_timeouts(aggregator, dd_run_check, sandbox, pg_instance):
    """A backend that stops answering (SIGSTOP) must not hang the run: CRITICAL, then a new connection."""
    import os
    import signal

    instance = {"postgres": {**pg_instance["postgres"], "query_timeout": 1, "connect_timeout": 2}}
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)
    pid = check.postgres.conn.info.backend_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        elapsed, message = timed_critical_run(aggregator, dd_run_check, check, "django_db.postgres.can_connect")
        assert "connect_timeout: timeout expired: no answer within query_timeout (2 s)" in message, message
        assert elapsed < 2 + 1.5, elapsed  # query_timeout plus the second left for the server's own timeout
        assert check.postgres.conn is None
    finally:
        os.kill(pid, signal.SIGCONT)
    aggregator.reset()
    dd_run_check(check)
    aggregator.assert_service_check("django_db.postgres.can_connect", AgentCheck.OK)
    assert check.postgres.conn.info.backend_pid != pid
    check.cancel()


def test_a_run_after_the_first_is_one_statement_on_the_same_connection(dd_run_check, pg_instance, clients):
    """Connections by group and the sessions of each database come back in one round trip."""
    clients.connect(app=APP)
    check = DjangoDbCheck("django_db", {}, [pg_instance])
    asked = statements_of_two_runs(dd_run_check, check, "postgres")
    assert len(asked) == 2 and asked[0] == asked[1]
    assert "pg_stat_activity" in asked[0] and "pg_stat_get_db_sessions" in asked[0]


def _parsed(conn: psycopg.Connection, run) -> list[str]:
    """The names of the statements libpq asked the server to parse during ``run()`` ('""' for an unnamed one)."""
    with tempfile.TemporaryFile(mode="w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            run()
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        lines = [line.split("\t") for line in trace.read().splitlines()]
    return [fields[3].split()[0] for fields in lines if fields[:1] == ["F"] and fields[2:3] == ["Parse"]]


def test_the_activity_statement_is_prepared_once_on_a_direct_connection(dd_run_check, pg_instance):
    check = DjangoDbCheck("django_db", {}, [pg_instance])
    try:
        dd_run_check(check)
        assert check.postgres.direct
        assert _parsed(check.postgres.conn, lambda: dd_run_check(check)) == []  # bound to the prepared statement
    finally:
        check.cancel()


def test_nothing_is_prepared_through_pgbouncer_in_transaction_mode(aggregator, dd_run_check, sandbox):
    """Each run may reach another server connection, where a statement prepared on the last does not exist."""
    started = sandbox.psql("SELECT now()").strip()
    pgbouncer = sandbox.pgbouncer.instance(Sandbox.MONITOR_USER)
    check = DjangoDbCheck("django_db", {}, [{"postgres": {**pgbouncer, "dbname": "postgres"}}])
    holder = psycopg.connect(
        host="127.0.0.1", port=sandbox.pgbouncer.port, dbname="postgres", user=Sandbox.MONITOR_USER,
        password=pgbouncer["password"], autocommit=True, prepare_threshold=None,
    )  # fmt: skip
    try:
        dd_run_check(check)
        assert not check.postgres.direct
        for i in range(8):
            # Every other run, another client holds the server connection the last run used.
            if i % 2:
                holder.execute("BEGIN")
                holder.execute("SELECT 1")
            aggregator.reset()
            parsed = _parsed(check.postgres.conn, lambda: dd_run_check(check))
            if i % 2:
                holder.execute("COMMIT")
            aggregator.assert_service_check("django_db.postgres.can_connect", AgentCheck.OK)
            assert parsed == ['""']  # one unnamed statement, parsed on whichever server connection it reaches
    finally:
        holder.close()
        check.cancel()
        # PgBouncer keeps its server connections open, idle: they would count as leaked in other tests.
        sandbox.psql(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            f" WHERE usename = '{Sandbox.MONITOR_USER}' AND backend_start >= '{started}'"
        )
