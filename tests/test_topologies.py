"""PgBouncer's server connections told apart in every wiring users run, against a real PostgreSQL listening on
127.0.0.1, 127.0.0.2, ::1 and its Unix socket, and real PgBouncers in front of it: PgBouncer and the check reaching
PostgreSQL at other addresses, two PgBouncers, a pooler the check cannot read (pooler_addresses), session mode.

Each case: a burst of 6 clients of `web` through PgBouncer in transaction mode, then quiet, leaves PgBouncer's
idle servers at PostgreSQL (server_idle_timeout 120 keeps them); `leaky` holds 2 idle connections straight to
PostgreSQL. Past the leak threshold, the check names `leaky`'s 2 and never PgBouncer's servers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.sandbox import PgBouncer, Sandbox, free_port

from .conftest import APP_PASSWORD, health_of, metric_values, one_value, run_health

LEAK = 2  # seconds: leak_idle_seconds of every case
BURST = 6


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    settings = {"listen_addresses": "'127.0.0.1,127.0.0.2,::1'"}
    with Sandbox(max_connections=80, pg_settings=settings, server_idle_timeout=120) as stack:
        stack.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        stack.psql("ALTER ROLE app SET statement_timeout = '30s'")
        stack.psql("ALTER ROLE app SET idle_in_transaction_session_timeout = '60s'")
        stack.psql("CREATE DATABASE appdb OWNER app")
        stack.pgbouncer.users["app"] = APP_PASSWORD
        stack.pgbouncer.reload()
        yield stack


def dial(bouncer: PgBouncer, host: str) -> None:
    """Make PgBouncer reach PostgreSQL at ``host`` (an address or the socket's directory), its servers closed."""
    bouncer.databases["*"] = f"host={host} port={bouncer.postgres.port}"
    bouncer.reload()


def forget_servers(box: Sandbox) -> None:
    """No backend of the application's role left from another case."""
    box.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'")
    deadline = time.monotonic() + 10
    while box.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'").strip() != "0":
        assert time.monotonic() < deadline, "the application's backends did not go"
        time.sleep(0.1)


def burst(bouncer: PgBouncer, app: str = "web", count: int = BURST) -> None:
    """``count`` clients of ``app`` at once through PgBouncer, each in a transaction long enough for all to need
    a server of their own; then they leave, and PgBouncer keeps its servers."""

    def one(_: int) -> None:
        with psycopg.connect(
            host="127.0.0.1", port=bouncer.port, user="app", password=APP_PASSWORD, dbname="appdb",
            application_name=app, autocommit=True, connect_timeout=5,
        ) as conn:  # fmt: skip
            conn.execute("SELECT pg_sleep(0.5)")

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(one, range(count)))


def connections(port: int, app: str, count: int) -> list[psycopg.Connection]:
    """``count`` connections of ``app`` to ``port`` on 127.0.0.1 (PostgreSQL or PgBouncer), kept open."""
    return [
        psycopg.connect(
            host="127.0.0.1",
            port=port,
            user="app",
            password=APP_PASSWORD,
            dbname="appdb",
            application_name=app,
            autocommit=True,
            connect_timeout=5,
        )
        for _ in range(count)
    ]


def leaky(box: Sandbox) -> list[psycopg.Connection]:
    """2 idle connections straight to PostgreSQL: a leak."""
    return connections(box.postgres.port, "leaky", 2)


def backends(box: Sandbox, app: str) -> int:
    return int(box.psql(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'").strip())


def monitor(box: Sandbox, host: str = "127.0.0.1", bouncers: tuple[PgBouncer, ...] | None = None) -> dict:
    bouncers = bouncers if bouncers is not None else (box.pgbouncer,)
    sections = [b.instance("datadog", Sandbox.MONITOR_PASSWORD) for b in bouncers]
    postgres = {**box.postgres.instance(Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD), "host": host}
    return {
        "postgres": postgres,
        "pgbouncer": sections[0] if len(sections) == 1 else sections,
        "leak_idle_seconds": LEAK,
        "conn_max_age": 0,
        "tags": ["env_name:test"],
    }


def judged(aggregator, dd_run_check, instance: dict) -> tuple[int, str]:
    """Two runs of one check (PgBouncer's servers known from the first read on), the second's health."""
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        dd_run_check(check)
        return run_health(aggregator, dd_run_check, check)
    finally:
        check.cancel()


def assert_only_the_direct_leak(aggregator, status: int, text: str, servers: int, app: str = "web") -> None:
    """PgBouncer's ``servers`` idle servers carry pooler:pgbouncer and are no leak; leaky's 2 are, exactly."""
    assert status == AgentCheck.WARNING, text
    assert text == f"WARNING: 2 connections of app=leaky idle for over {LEAK} s (leaked)"
    assert metric_values(aggregator, "django_db.postgres.leaked_connections", f"app:{app}") in ([], [0])
    assert one_value(aggregator, "django_db.postgres.leaked_connections", "app:leaky") == 2
    pooled = metric_values(aggregator, "django_db.postgres.connections", f"app:{app}", "pooler:pgbouncer")
    assert sum(pooled) == servers >= 1
    bare = [m.tags for m in aggregator.metrics("django_db.postgres.connections") if f"app:{app}" in m.tags]
    assert all("pooler:pgbouncer" in tags for tags in bare)


@pytest.mark.parametrize(
    ("pgbouncer_dials", "check_dials"),
    [
        pytest.param("127.0.0.2", "127.0.0.1", id="pgbouncer-at-another-address"),
        pytest.param("::1", "127.0.0.1", id="pgbouncer-over-ipv6"),
        pytest.param("127.0.0.1", "socket", id="check-over-the-unix-socket"),
        pytest.param("socket", "127.0.0.1", id="pgbouncer-over-the-unix-socket"),
        pytest.param("127.0.0.1", "::1", id="check-over-ipv6"),
    ],
)
def test_pgbouncers_idle_servers_are_never_a_leak_whatever_address_either_side_dials(
    aggregator, dd_run_check, box, pgbouncer_dials, check_dials
):
    socket = str(box.postgres.socket_dir)
    forget_servers(box)
    dial(box.pgbouncer, socket if pgbouncer_dials == "socket" else pgbouncer_dials)
    held = leaky(box)
    try:
        burst(box.pgbouncer)
        servers = backends(box, "web")
        time.sleep(LEAK + 0.5)
        instance = monitor(box, host=socket if check_dials == "socket" else check_dials)
        status, text = judged(aggregator, dd_run_check, instance)
    finally:
        for conn in held:
            conn.close()
        dial(box.pgbouncer, "127.0.0.1")
    assert_only_the_direct_leak(aggregator, status, text, servers)


def test_two_pgbouncers_are_each_read_and_each_ones_servers_told_apart(aggregator, dd_run_check, box):
    """Two PgBouncers in front of one PostgreSQL (one per application), both listed: each one's pools under its
    own pgbouncer_server tag, each one's idle servers PgBouncer's, not `web`'s or `api`'s leak."""
    second = PgBouncer(
        box.root / "pgbouncer2", box.postgres, dict(box.pgbouncer.users), None, **box.pgbouncer.settings
    ).start()
    forget_servers(box)
    held = leaky(box)
    try:
        dial(second, "::1")
        burst(box.pgbouncer, "web")
        burst(second, "api", 4)
        servers = {"web": backends(box, "web"), "api": backends(box, "api")}
        time.sleep(LEAK + 0.5)
        status, text = judged(aggregator, dd_run_check, monitor(box, bouncers=(box.pgbouncer, second)))
        tags = {f"pgbouncer_server:127.0.0.1:{b.port}" for b in (box.pgbouncer, second)}
        sent = {t for m in aggregator.metrics("django_db.pgbouncer.pools.sv_idle") for t in m.tags}
        assert tags <= sent
        for tag in tags:
            aggregator.assert_service_check(
                "django_db.pgbouncer.can_connect", AgentCheck.OK, tags=[tag, "env_name:test"]
            )
        assert_only_the_direct_leak(aggregator, status, text, servers["web"], "web")
        assert_only_the_direct_leak(aggregator, status, text, servers["api"], "api")
    finally:
        for conn in held:
            conn.close()
        second.stop()


def test_a_pooler_the_check_cannot_read_is_declared_by_its_address(aggregator, dd_run_check, box):
    """A sidecar PgBouncer the Agent cannot reach, connecting from ::1: its idle servers are `pooler:external`
    once pooler_addresses names ::1/128, never `web`'s leak; leaky's, from 127.0.0.1, still are."""
    forget_servers(box)
    dial(box.pgbouncer, "::1")
    held = leaky(box)
    try:
        burst(box.pgbouncer)
        servers = backends(box, "web")
        time.sleep(LEAK + 0.5)
        instance = monitor(box)
        del instance["pgbouncer"]
        status, text = judged(aggregator, dd_run_check, {**instance, "pooler_addresses": ["::1/128"]})
    finally:
        for conn in held:
            conn.close()
        dial(box.pgbouncer, "127.0.0.1")
    assert status == AgentCheck.WARNING, text
    assert text == f"WARNING: 2 connections of app=leaky idle for over {LEAK} s (leaked)"
    external = metric_values(aggregator, "django_db.postgres.connections", "app:web", "pooler:external")
    assert sum(external) == servers == BURST
    assert metric_values(aggregator, "django_db.postgres.leaked_connections", "app:web") in ([], [0])


def test_a_pgbouncer_whose_servers_match_no_backend_is_said_once(aggregator, dd_run_check, box, caplog, monkeypatch):
    """PgBouncer's servers, but the address it connects from is not the one PostgreSQL sees (a NAT between them,
    stood for here by reading PgBouncer's local_addr as another address): said in the health message while it
    lasts, and once in the log."""
    from datadog_checks.django_db.evaluate import pooler as rule

    forget_servers(box)
    burst(box.pgbouncer)
    real = rule.identities
    monkeypatch.setattr(
        rule, "identities", lambda server, where: real(server._replace(local_addr="198.51.100.7"), where)
    )
    check = DjangoDbCheck("django_db", {}, [monitor(box)])
    try:
        _, first = run_health(aggregator, dd_run_check, check)
        assert "none of PgBouncer's" not in first  # once could be servers closed between the two reads
        dd_run_check(check)
        status, text = run_health(aggregator, dd_run_check, check)
    finally:
        check.cancel()
    logged = [r.getMessage() for r in caplog.records if "none of PgBouncer's" in r.getMessage()]
    assert status == AgentCheck.WARNING
    assert f"none of PgBouncer's {backends(box, 'web')} server connections is a backend PostgreSQL shows" in text
    assert text.endswith("list the addresses PostgreSQL sees PgBouncer's connections come from under pooler_addresses")
    assert len(logged) == 1


def test_a_session_mode_leak_is_reported_once_with_both_figures(aggregator, dd_run_check, box):
    """In session mode an idle client pins its server: one leak finding (PgBouncer's clients, naming the servers
    they pin at PostgreSQL), while each side's metrics stay as they are."""
    box.pgbouncer.settings["pool_mode"] = "session"
    box.pgbouncer.reload()
    forget_servers(box)
    sticky = connections(box.pgbouncer.port, "sticky", 3)
    try:
        for conn in sticky:
            conn.execute("SELECT 1")
        time.sleep(LEAK + 1.5)  # PgBouncer's request_time counts whole seconds
        check = DjangoDbCheck("django_db", {}, [monitor(box)])
        try:
            dd_run_check(check)
            status, text = run_health(aggregator, dd_run_check, check)
        finally:
            check.cancel()
    finally:
        for conn in sticky:
            conn.close()
        box.pgbouncer.settings["pool_mode"] = "transaction"
        box.pgbouncer.reload()
    assert status == AgentCheck.WARNING
    assert text.count("WARNING:") == 1, text
    assert text.startswith("WARNING: 3 client connections of app=sticky held at PgBouncer idle for over 2 s")
    assert "in session mode each also pins a server connection (3 at PostgreSQL)" in text
    assert one_value(aggregator, "django_db.postgres.leaked_connections", "app:sticky") == 3
    assert one_value(aggregator, "django_db.pgbouncer.leaked_clients", "app:sticky") == 3
    leaks = [m.tags for m in aggregator.metrics("django_db.finding") if "app:sticky" in m.tags]
    assert len(leaks) == 1 and "finding:leaked_clients" in leaks[0]


def test_no_backend_is_judged_as_an_applications_until_pgbouncer_is_read(aggregator, dd_run_check, box, caplog):
    """PgBouncer unreachable at the first run: its idle servers at PostgreSQL cannot be told from `web`'s own, so
    no leak or budget is judged there (said in the log), until PgBouncer is read."""
    forget_servers(box)
    burst(box.pgbouncer)
    time.sleep(LEAK + 0.5)
    instance = monitor(box)
    instance["pgbouncer"] = {**instance["pgbouncer"], "port": free_port()}  # nothing listens there
    instance["apps"] = [{"match": "^web$", "max_connections": 2}]
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        status, text = run_health(aggregator, dd_run_check, check)
    finally:
        check.cancel()
    aggregator.assert_service_check("django_db.pgbouncer.can_connect", AgentCheck.CRITICAL)
    assert "leaked" not in text and "budget" not in text
    assert aggregator.metrics("django_db.postgres.leaked_connections") == []
    assert any("could not be read yet" in r.getMessage() for r in caplog.records)
    assert (status, text.split(":")[1].strip()) == (AgentCheck.CRITICAL, "connection_refused seen (1 from pgbouncer)")


def test_what_pgbouncer_said_of_its_servers_expires(aggregator, dd_run_check, box, monkeypatch):
    """A PgBouncer that hangs: what it last said of its servers stands for them a while (its idle servers are no
    leak), then expires, and nothing at PostgreSQL is judged as an application's until it answers again."""
    from datadog_checks.django_db import check as module

    forget_servers(box)
    burst(box.pgbouncer)
    time.sleep(LEAK + 0.5)
    instance = monitor(box)
    instance["pgbouncer"] = {**instance["pgbouncer"], "query_timeout": 1, "connect_timeout": 1}
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        dd_run_check(check)
        box.pgbouncer.pause()
        try:
            status, text = run_health(aggregator, dd_run_check, check)  # PgBouncer hung: its last read stands
            assert "leaked" not in text and "connect_timeout" in text, text
            assert metric_values(aggregator, "django_db.postgres.leaked_connections", "app:web") in ([], [0])
            monkeypatch.setattr(module, "KEPT_SECONDS", 0.0)
            status, text = run_health(aggregator, dd_run_check, check)
        finally:
            box.pgbouncer.resume()
        assert "leaked" not in text and "connect_timeout" in text, text
        assert aggregator.metrics("django_db.postgres.leaked_connections") == []
        monkeypatch.undo()
        status, text = run_health(aggregator, dd_run_check, check)
        assert status == AgentCheck.OK and "app=web" not in text, text
        assert metric_values(aggregator, "django_db.postgres.leaked_connections", "app:web") in ([], [0])
    finally:
        check.cancel()
    health_of(aggregator)
