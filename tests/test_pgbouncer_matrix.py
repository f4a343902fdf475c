"""The PgBouncer side on each version users run: 1.15, 1.18 (the machine's own), 1.24 and 1.26.

Each version is a live PgBouncer in front of one PostgreSQL 15 (the machine's): 1.15 from Debian
bullseye, 1.24 from trixie, 1.26 from sid, fetched once by django_db_tools.debian into the user's
cache. A few fast tests each; the whole suite runs on 1.18. DJANGO_DB_LEAVE_OUT=pgbouncer-1.26,...
leaves versions out (reported as skipped); a version that cannot be fetched fails its tests, naming
the suite and package.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck, config
from django_db_tools import debian
from django_db_tools.sandbox import SUPERUSER, PgBouncer, Sandbox, pgbouncer_binary

from .conftest import APP_PASSWORD, VERSIONS_RAN, load_recorder, matrix, metric_values, one_value

MACHINE = "1.18"  # what `apt-get install pgbouncer` gives on Debian 12
VERSIONS = ("1.15", MACHINE, "1.24", "1.26")
RECORDED = Path(__file__).parent / "recorded"
HEALTH = "django_db.connection_health"
CAN_CONNECT = "django_db.pgbouncer.can_connect"
P = "django_db.pgbouncer."
SIZED_POOL, SIZED_RESERVE, SIZED_LIMIT = 7, 2, 30  # the recorder's `sized` pool


RECORDER = load_recorder()


@dataclass
class Bouncer:
    version: str  # "1.24"
    box: Sandbox

    @property
    def pgbouncer(self) -> PgBouncer:
        return self.box.pgbouncer

    @property
    def tag(self) -> str:
        return f"pgbouncer-{self.version}"

    def instance(self, **options: object) -> dict:
        return {"pgbouncer": self.pgbouncer.instance("datadog"), **options}

    def connect(self, user: str = "app", dbname: str = "appdb", **kwargs: object) -> psycopg.Connection:
        password = APP_PASSWORD if user == "app" else self.pgbouncer.users[user]
        return psycopg.connect(
            host="127.0.0.1", port=self.pgbouncer.port, user=user, password=password, dbname=dbname,
            autocommit=True, connect_timeout=5, sslmode="disable", prepare_threshold=None, **kwargs,
        )  # fmt: skip

    def reload(self, **settings: object) -> None:
        """Reload with these settings; return once the console shows them."""
        self.pgbouncer.settings.update(settings)
        self.pgbouncer.reload()
        with self.connect(SUPERUSER, "pgbouncer", cursor_factory=psycopg.ClientCursor) as admin:
            deadline = time.monotonic() + 10
            while True:
                shown = {str(row[0]): str(row[1]) for row in admin.execute("SHOW CONFIG").fetchall()}
                if all(shown.get(key) == str(value) for key, value in settings.items()):
                    return
                assert time.monotonic() < deadline, f"PgBouncer never took {settings}"
                time.sleep(0.05)


@pytest.fixture(scope="module", params=matrix(tuple(f"pgbouncer-{v}" for v in VERSIONS)))
def bouncer(request) -> Iterator[Bouncer]:
    version = request.param.removeprefix("pgbouncer-")
    with contextlib.ExitStack() as stack:
        program = None
        if version != MACHINE:
            build = debian.fetch(debian.PGBOUNCER[version])  # a failure names the suite and package
            program = stack.enter_context(debian.runnable(build)).command("pgbouncer")
        box = stack.enter_context(
            Sandbox(max_connections=40, default_pool_size=20, max_client_conn=100, query_wait_timeout=1,
                    pgbouncer_program=program)
        )  # fmt: skip
        RECORDER.prepare(box)
        box.pgbouncer.databases["tiny"] = f"host=127.0.0.1 port={box.postgres.port} dbname=appdb pool_size=1"
        box.pgbouncer.reload()
        shown = subprocess.run([*(program or [pgbouncer_binary()]), "-V"], capture_output=True, text=True, timeout=30)
        VERSIONS_RAN[request.param] = shown.stdout.splitlines()[0]
        yield Bouncer(version, box)


def _errors(aggregator, signature: str, source: str) -> float:
    return sum(metric_values(aggregator, "django_db.errors", f"signature:{signature}", f"source:{source}"))


def _health(aggregator) -> tuple[int, str]:
    (found,) = aggregator.service_checks(HEALTH)
    return found.status, found.message or ""


def test_runs_the_version_asked_for_and_answers_as_recorded(bouncer):
    """SHOW results as this version answers them: the same columns as its recording, tests/recorded/."""
    live = RECORDER.read(bouncer.box)
    version = live["VERSION"]["rows"][0][0]
    print(f"\n[{bouncer.tag}] {version}")
    assert version.startswith(f"PgBouncer {bouncer.version}.")
    recorded = json.loads((RECORDED / f"pgbouncer_{bouncer.version}.json").read_text())
    assert recorded["_about"] == RECORDER.about(version.split()[-1])
    for show, result in live.items():
        assert result["columns"] == recorded[show]["columns"], show
    databases = {row[0] for row in live["DATABASES"]["rows"]}
    assert {"appdb", "sized", "pgbouncer"} <= databases


def test_every_show_read_by_column_name(aggregator, dd_run_check, datadog_agent, bouncer):
    held = bouncer.connect(dbname="sized")
    held.execute("BEGIN")
    held.execute("SELECT 1")  # one server active in `sized`
    instance = bouncer.instance(extra_metrics=list(config.METRIC_GROUPS), otel_semconv="current")
    check = DjangoDbCheck("django_db", {}, [instance])
    check.check_id = "test:pgbouncer"
    try:
        dd_run_check(check)
        full = bouncer.pgbouncer.version
        datadog_agent.assert_metadata("test:pgbouncer", {"version.raw": ".".join(map(str, full))})
        sized = ("pgbouncer_db:sized", "user:app", "pool_mode:transaction")
        assert one_value(aggregator, f"{P}pools.cl_active", *sized) == 1
        assert one_value(aggregator, f"{P}pools.sv_active", *sized) == 1
        assert one_value(aggregator, f"{P}pools.server_utilization", *sized) == pytest.approx(1 / SIZED_POOL)
        assert one_value(aggregator, f"{P}databases.pool_size", "pgbouncer_db:sized") == SIZED_POOL
        # `reserve_pool` before 1.24, `reserve_pool_size` from 1.24: one metric.
        assert one_value(aggregator, f"{P}databases.reserve_pool_size", "pgbouncer_db:sized") == SIZED_RESERVE
        assert one_value(aggregator, f"{P}databases.max_connections", "pgbouncer_db:sized") == SIZED_LIMIT
        pool = f"db.client.connection.pool.name:127.0.0.1:{bouncer.pgbouncer.port}/sized/app"
        assert one_value(aggregator, "db.client.connection.max", pool) == SIZED_POOL + SIZED_RESERVE
        assert one_value(aggregator, "db.client.connection.count", pool, "db.client.connection.state:used") == 1
        assert one_value(aggregator, f"{P}max_client_conn") == 100
        assert one_value(aggregator, f"{P}lists.used_clients") == one_value(aggregator, f"{P}clients") >= 2
        cancel = {n for n in aggregator.metric_names if "cancel" in n}
        assert bool(cancel) == (full >= (1, 18)), cancel  # the cancel columns came in 1.18
        assert metric_values(aggregator, f"{P}pools.cl_active", "pgbouncer_db:pgbouncer") == []
        held.execute("COMMIT")
        for _ in range(3):
            held.execute("SELECT 1")
        aggregator.reset()
        dd_run_check(check)
        assert one_value(aggregator, f"{P}stats.transactions", "pgbouncer_db:sized") > 0
        assert 0 < one_value(aggregator, f"{P}stats.xact_time", "pgbouncer_db:sized") < 5  # seconds
    finally:
        held.close()
        check.cancel()


def test_waiting_clients_maxwait_then_query_wait_timeout(aggregator, dd_run_check, bouncer):
    log = str(bouncer.pgbouncer.logfile)
    check = DjangoDbCheck("django_db", {}, [bouncer.instance(log_files=[log], otel_semconv="both")])
    holder, waiter = bouncer.connect(dbname="tiny"), bouncer.connect(dbname="tiny")
    pool = f"db.client.connection.pool.name:127.0.0.1:{bouncer.pgbouncer.port}/tiny/app"
    failure: list[BaseException] = []

    def wait() -> None:
        try:
            waiter.execute("SELECT 1")
        except psycopg.Error as e:
            failure.append(e)

    try:
        dd_run_check(check)  # the log is followed from its end
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # holds the pool's only server
        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        time.sleep(0.3)
        aggregator.reset()
        dd_run_check(check)
        tiny = ("pgbouncer_db:tiny",)
        assert one_value(aggregator, f"{P}pools.cl_waiting", *tiny) == 1
        assert one_value(aggregator, f"{P}pools.sv_active", *tiny) == 1
        maxwait = one_value(aggregator, f"{P}pools.maxwait", *tiny)
        assert 0.2 < maxwait < 1.5, maxwait  # seconds and microseconds added up
        assert one_value(aggregator, "db.client.connection.pending_requests", pool) == 1
        thread.join(10)  # query_wait_timeout = 1 s
        assert not thread.is_alive()
        (error,) = failure
        severity = error.diag.severity
        print(f"\n[{bouncer.tag}] {severity}: {error.diag.message_primary} ({error.sqlstate})")
        assert error.diag.message_primary == "query_wait_timeout" and error.sqlstate == "08P01"
        # ERROR on 1.15, FATAL on 1.18 and later: the client's connection is closed either way.
        assert severity == ("FATAL" if bouncer.pgbouncer.version >= (1, 18) else "ERROR")
        aggregator.reset()
        dd_run_check(check)
        status, message = _health(aggregator)
        assert status == AgentCheck.CRITICAL
        assert "CRITICAL: query_wait_timeout seen (1 from log)" in message, message
        assert _errors(aggregator, "query_wait_timeout", "log") == 1
        # this version's log line names the pool: OpenTelemetry's timeouts count it there, once
        assert one_value(aggregator, "db.client.connection.timeouts", pool) == 1
    finally:
        holder.close()
        waiter.close()
        check.cancel()


def test_max_client_conn_refusal(aggregator, dd_run_check, bouncer):
    log = str(bouncer.pgbouncer.logfile)
    bouncer.reload(max_client_conn=3)
    check = DjangoDbCheck("django_db", {}, [bouncer.instance(log_files=[log])])  # reads SHOW CONFIG on connect
    held: list[psycopg.Connection] = []
    try:
        dd_run_check(check)  # its console connection is one client
        held += [bouncer.connect(), bouncer.connect()]
        with pytest.raises(psycopg.OperationalError) as refused:
            held.append(bouncer.connect())
        text = str(refused.value)
        print(f"\n[{bouncer.tag}] {text.strip()}")
        severity = "FATAL" if bouncer.pgbouncer.version >= (1, 18) else "ERROR"
        assert f"{severity}:  no more connections allowed (max_client_conn)" in text
        aggregator.reset()
        dd_run_check(check)
        status, message = _health(aggregator)
        assert status == AgentCheck.CRITICAL
        assert "CRITICAL: 3 of 3 PgBouncer client connections in use (100% of max_client_conn)" in message, message
        assert "CRITICAL: max_client_conn seen (1 from log)" in message, message
        assert _errors(aggregator, "max_client_conn", "log") == 1
    finally:
        for conn in held:
            conn.close()
        check.cancel()
        bouncer.reload(max_client_conn=100)


def test_clients_by_application_and_state(aggregator, dd_run_check, bouncer):
    """SHOW CLIENTS on each version: application_name from 1.18 (none before), `idle` state from 1.25."""
    held = [bouncer.connect(application_name="matrix-web") for _ in range(2)]
    try:
        for conn in held:
            conn.execute("SELECT 1")
        check = DjangoDbCheck("django_db", {}, [bouncer.instance()])
        dd_run_check(check)
        check.cancel()
        app = "matrix-web" if bouncer.pgbouncer.version >= (1, 18) else "none"
        tags = ("pgbouncer_db:appdb", "user:app", f"app:{app}", "state:idle")
        assert one_value(aggregator, f"{P}client_connections", *tags) == 2
    finally:
        for conn in held:
            conn.close()


def test_idle_clients_past_the_threshold_are_leaked_clients(aggregator, dd_run_check, bouncer):
    """Idle time from each version's request_time, against PgBouncer's own clock (the console's request)."""
    held = [bouncer.connect(application_name="matrix-leaky") for _ in range(2)]
    try:
        for conn in held:
            conn.execute("SELECT 1")
        time.sleep(2.1)  # whole seconds: past leak_idle_seconds=1 on any rounding
        check = DjangoDbCheck("django_db", {}, [bouncer.instance(leak_idle_seconds=1)])
        dd_run_check(check)
        check.cancel()
        app = "matrix-leaky" if bouncer.pgbouncer.version >= (1, 18) else "none"
        assert one_value(aggregator, f"{P}leaked_clients", "pgbouncer_db:appdb", "user:app", f"app:{app}") == 2
        _, text = _health(aggregator)
        assert f"2 client connections of app={app} held at PgBouncer idle for over 1 s (leaked" in text
    finally:
        for conn in held:
            conn.close()


def test_no_application_name_before_1_18_is_said_once(dd_run_check, bouncer, caplog):
    check = DjangoDbCheck("django_db", {}, [bouncer.instance()])
    try:
        with caplog.at_level("INFO"):
            dd_run_check(check)
            dd_run_check(check)
    finally:
        check.cancel()
    said = [r for r in caplog.records if "no application_name in SHOW CLIENTS" in r.getMessage()]
    assert len(said) == (1 if bouncer.pgbouncer.version < (1, 18) else 0)


def test_console_user_not_allowed(aggregator, dd_run_check, bouncer):
    instance = {"pgbouncer": bouncer.pgbouncer.instance("app", APP_PASSWORD)}
    dd_run_check(DjangoDbCheck("django_db", {}, [instance]))
    (found,) = aggregator.service_checks(CAN_CONNECT)
    assert found.status == AgentCheck.CRITICAL
    assert ": console_not_allowed: " in found.message and "stats_users" in found.message, found.message
    assert _errors(aggregator, "console_not_allowed", "pgbouncer") == 1


# Last in this module: PgBouncer is stopped and started again.
def test_restart_and_reconnect(aggregator, dd_run_check, bouncer):
    check = DjangoDbCheck("django_db", {}, [bouncer.instance()])
    client = bouncer.connect()
    client.execute("SELECT 1")
    try:
        dd_run_check(check)
        aggregator.assert_service_check(CAN_CONNECT, AgentCheck.OK)
        # From 1.23 SIGTERM waits for every client (this one, the check's) to leave: the sandbox sends
        # SIGQUIT there, the immediate shutdown, and SIGTERM before; it never has to kill.
        assert bouncer.pgbouncer.stop() is False
        bouncer.pgbouncer.start()
        aggregator.reset()
        dd_run_check(check)
        aggregator.assert_service_check(CAN_CONNECT, AgentCheck.OK)
        status, message = _health(aggregator)
        assert status == AgentCheck.OK, message
        counted = {
            tuple(t for t in m.tags if t.startswith(("signature:", "source:"))): m.value
            for m in aggregator.metrics("django_db.errors")
        }
        assert counted == {("signature:server_closed", "source:pgbouncer"): 1}
        assert metric_values(aggregator, f"{P}max_client_conn") == [100]
    finally:
        client.close()
        check.cancel()


def test_pgbouncers_server_connections_are_told_apart_at_postgresql(aggregator, dd_run_check, bouncer):
    """SHOW SERVERS on each version: the backend of a server PgBouncer keeps idle is tagged pooler:pgbouncer
    and is no leak; a direct connection beside it is one."""
    box = bouncer.box
    with (
        bouncer.connect(application_name="matrix-pooled") as through,
        psycopg.connect(box.postgres.dsn(), application_name="matrix-direct", autocommit=True),
    ):
        through.execute("SELECT 1")  # the server now carries the client's name
        time.sleep(1.2)
        instance = {**box.instance(), "leak_idle_seconds": 1, "applications": {"include": ["^matrix-"]}}
        check = DjangoDbCheck("django_db", {}, [instance])
        try:
            dd_run_check(check)
        finally:
            check.cancel()
    pooled = metric_values(aggregator, "django_db.postgres.connections", "app:matrix-pooled", "pooler:pgbouncer")
    assert sum(pooled) == 1
    assert not metric_values(aggregator, "django_db.postgres.connections", "app:matrix-direct", "pooler:pgbouncer")
    leaked = "django_db.postgres.leaked_connections"
    assert one_value(aggregator, leaked, "app:matrix-direct") == 1
    assert metric_values(aggregator, leaked, "app:matrix-pooled") in ([], [0])
    _, text = _health(aggregator)
    assert "of app=matrix-direct idle for over 1 s (leaked)" in text, text
    assert "connections of app=matrix-pooled idle for over" not in text, text  # its client at PgBouncer is its own
