"""PgBouncer's own server connections at PostgreSQL are PgBouncer's: no leak, budget or alarm blamed on the
application whose name PgBouncer's last client gave them. Real Django applications under gunicorn, a real
PgBouncer in transaction mode and a real PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.config import parse
from datadog_checks.django_db.evaluate.churn import POOLER, Churn, ChurnWindow, Sample, churn_finding
from datadog_checks.django_db.evaluate.django_metrics import DjangoHistory, django_findings
from datadog_checks.django_db.evaluate.health import signature_findings
from datadog_checks.django_db.evaluate.model import Subject, message
from datadog_checks.django_db.evaluate.pooler import Pooler, ServerEvents, overdue_findings, pooler_keys
from datadog_checks.django_db.records import (
    POOLER_OWN,
    ActivityGroup,
    DjangoAlias,
    DjangoScrape,
    PgbConfig,
    PgbServer,
    PgSnapshot,
    ServerAddress,
    ServerSettings,
)
from datadog_checks.django_db.sources.pgbouncer import Result, parse_servers
from django_db_tools.sandbox import SUPERUSER, SUPERUSER_PASSWORD, Sandbox
from django_db_tools.webapp.harness import Database, Webapp

from .conftest import APP_PASSWORD, Clients, health, metric_values, one_value, run_new_check

POOL_SIZE = 8


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    """A stack of this module's own: PgBouncer in transaction mode keeping idle servers for a minute, and an
    application role with its timeouts set, so that a healthy stack has nothing to say."""
    with Sandbox(max_connections=60, default_pool_size=POOL_SIZE, server_idle_timeout=60) as stack:
        stack.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        stack.psql("ALTER ROLE app SET statement_timeout = '30s'")
        stack.psql("CREATE DATABASE appdb OWNER app")
        stack.pgbouncer.users["app"] = APP_PASSWORD
        stack.pgbouncer.reload()
        yield stack


def start(box: Sandbox, through: str = "pgbouncer", **settings: object) -> Webapp:
    port = box.pgbouncer.port if through == "pgbouncer" else box.postgres.port
    return Webapp(Database("127.0.0.1", port, "appdb", "app", APP_PASSWORD), **settings).start()  # type: ignore[arg-type]


def settle(box: Sandbox, seconds: float) -> None:
    """Wait until every client backend but our own has been idle for ``seconds``."""
    deadline = time.monotonic() + 30
    with psycopg.connect(box.postgres.dsn(), autocommit=True) as conn:
        while time.monotonic() < deadline:
            busy = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid() AND (state <> 'idle' OR state_change > now() - make_interval(secs => %s))",
                [seconds],
            ).fetchone()[0]
            if busy == 0:
                return
            time.sleep(0.2)
    raise AssertionError("backends still busy")


def test_a_burst_through_transaction_pooling_then_quiet_is_no_leak_but_a_real_leak_beside_it_is(
    aggregator, dd_run_check, box
):
    """16 slow requests through PgBouncer (pool_size 8) leave 8 idle servers PgBouncer keeps on purpose until
    server_idle_timeout; 3 connections `leaky` opens straight to PostgreSQL and forgets are a leak."""
    clients = Clients(box)
    web = start(box, app_name="web", threads=16, conn_max_age=None)
    try:
        replies = web.drive("/sleep/?seconds=0.5", count=16, concurrency=16)
        assert {r.status for r in replies} == {200}
        clients.many(3, app="leaky")
        settle(box, 2.5)
        instance = {
            **box.instance(),
            "leak_idle_seconds": 2,
            "report_leak_queries": True,  # the suspects are the leak's, never PgBouncer's servers
            # persistent connections, as the application runs them: its 16 threads' clients at PgBouncer are its
            # budget; the 8 servers would break it if they were counted too
            "apps": [{"match": "^web$", "max_connections": 16, "conn_max_age": None}],
        }
        status, text = health(aggregator, dd_run_check, instance)
    finally:
        web.close()
        clients.close()
    assert status == AgentCheck.WARNING
    assert "3 connections of app=leaky idle for over 2 s (leaked); suspects: app=leaky from 127.0.0.1 idle " in text
    # Neither a leak nor over its budget: the 8 servers are PgBouncer's, and its 16 clients at PgBouncer are within
    # its budget and its leak threshold (600 s for persistent connections).
    assert "web" not in text
    assert metric_values(aggregator, "django_db.postgres.leaked_connections", "app:web") in ([], [0])
    assert one_value(aggregator, "django_db.postgres.leaked_connections", "app:leaky") == 3
    # PgBouncer's servers keep the app tag its last client gave them, and say whose they are.
    pooled = metric_values(aggregator, "django_db.postgres.connections", "app:web", "pooler:pgbouncer", "state:idle")
    assert pooled == [POOL_SIZE]
    leaky = [m.tags for m in aggregator.metrics("django_db.postgres.connections") if "app:leaky" in m.tags]
    assert leaky and not any("pooler:pgbouncer" in tags for tags in leaky)
    assert one_value(aggregator, "django_db.app.connections", "app:web", "counted_at:postgres") == 0
    assert one_value(aggregator, "django_db.app.connections", "app:web", "counted_at:pgbouncer") == 16


def test_a_healthy_stack_says_nothing(aggregator, dd_run_check, box):
    """Django's pool through PgBouncer, light load, then quiet past the leak threshold: no finding at all."""
    web = start(box, app_name="pooled-web", threads=4, pool="django", pool_min_size=2, pool_max_size=4)
    try:
        replies = web.drive("/query/", count=20, concurrency=2)
        assert {r.status for r in replies} == {200}
        settle(box, 2.5)
        instance = {
            **box.instance(),
            "leak_idle_seconds": 2,
            "tags": ["env_name:test"],
            # the pool keeps its connections (to PgBouncer) on purpose, 4 a process
            "apps": [{"match": "^pooled-web$", "max_connections": 4, "pooled": True}],
        }
        status, text = health(aggregator, dd_run_check, instance)
    finally:
        web.close()
    assert (status, text) == (AgentCheck.OK, "")
    aggregator.assert_service_check("django_db.config_alignment", AgentCheck.OK)
    assert metric_values(aggregator, "django_db.postgres.connections", "app:pooled-web", "pooler:pgbouncer")


def test_servers_of_another_postgres_that_pgbouncer_fronts_are_never_taken_for_this_ones(aggregator, dd_run_check, box):
    """PgBouncer fronts a second PostgreSQL too: its server connections there are not this server's."""
    second = Sandbox(max_connections=20).start(with_pgbouncer=False)
    other = second.postgres
    try:
        box.pgbouncer.databases["elsewhere"] = f"host=127.0.0.1 port={other.port} dbname=postgres"
        box.pgbouncer.reload()
        through = {"host": "127.0.0.1", "port": box.pgbouncer.port, "autocommit": True}
        with (
            psycopg.connect(**through, user=SUPERUSER, password=SUPERUSER_PASSWORD, dbname="elsewhere") as there,
            psycopg.connect(
                **through, user="app", password=APP_PASSWORD, dbname="appdb", application_name="here"
            ) as here,
        ):
            [there_pid] = there.execute("SELECT pg_backend_pid()").fetchone()
            here.execute("SELECT 1")
            check = DjangoDbCheck("django_db", {}, [box.instance()])
            try:
                dd_run_check(check)
                [pooler] = check.poolers.values()
                addrs = {(s.port, s.remote_pid) for s in pooler.servers}
                assert (other.port, there_pid) in addrs  # PgBouncer lists it ...
                # ... but only its servers here are PgBouncer's backends here, the other server's not among them
                here_count = len([s for s in pooler.servers if s.port == box.postgres.port])
                pooled = metric_values(aggregator, "django_db.postgres.connections", "pooler:pgbouncer")
                assert sum(pooled) == here_count < len(pooler.servers)
                assert metric_values(aggregator, "django_db.postgres.connections", "app:here", "pooler:pgbouncer")
            finally:
                check.cancel()
    finally:
        del box.pgbouncer.databases["elsewhere"]
        box.pgbouncer.reload()
        second.close()


def alignment(aggregator, dd_run_check, box: Sandbox, **instance: object) -> tuple[int, str]:
    run_new_check(aggregator, dd_run_check, {**box.instance(), **instance})
    [status] = aggregator.service_checks("django_db.config_alignment")
    print(f"\n[alignment {status.status}] {status.message}")
    return status.status, status.message or ""


def test_conn_max_age_is_judged_against_client_idle_timeout_only(aggregator, dd_run_check, box):
    """server_idle_timeout (60 s here) closes PgBouncer's unused servers, never Django's connections: no rule.
    client_idle_timeout closes Django's own idle connections; session mode pins a server per Django thread."""
    with psycopg.connect(
        host="127.0.0.1", port=box.pgbouncer.port, user="app", password=APP_PASSWORD, dbname="appdb", autocommit=True
    ) as client:
        client.execute("SELECT 1")
        assert alignment(aggregator, dd_run_check, box, conn_max_age=300) == (AgentCheck.OK, "")
        assert alignment(aggregator, dd_run_check, box, conn_max_age=None) == (AgentCheck.OK, "")
    box.pgbouncer.settings["client_idle_timeout"] = 120
    try:
        box.pgbouncer.reload()
        status, text = alignment(aggregator, dd_run_check, box, conn_max_age=300)
        assert status == AgentCheck.WARNING
        assert text == (
            "conn_max_age=300 s is longer than PgBouncer's client_idle_timeout=120 s, after which it closes idle "
            "client connections (Django's): a request that reuses one fails; keep CONN_MAX_AGE at or below it "
            "(with CONN_HEALTH_CHECKS=True), or raise client_idle_timeout"
        )
        assert alignment(aggregator, dd_run_check, box, conn_max_age=60) == (AgentCheck.OK, "")
        box.pgbouncer.settings["pool_mode"] = "session"
        box.pgbouncer.reload()
        status, text = alignment(aggregator, dd_run_check, box, conn_max_age=60)
        assert status == AgentCheck.WARNING and "server_idle_timeout" not in text
        assert text.startswith("conn_max_age=60 s while PgBouncer pools ") and "in session mode" in text
    finally:
        del box.pgbouncer.settings["client_idle_timeout"]
        box.pgbouncer.settings["pool_mode"] = "transaction"
        box.pgbouncer.reload()


def server(
    pid: int,
    addr: str = "127.0.0.1",
    port: int = 5432,
    local_port: int = 40000,
    linked: bool = False,
    local_addr: str = "127.0.0.1",
    db: str = "appdb",
):
    state = "active" if linked else "idle"
    return PgbServer(db, "app", state, addr, port, local_port, pid, linked, "web", local_addr)


def test_a_server_connection_is_known_by_its_own_identity_whatever_address_either_side_dials():
    """The key is the backend's pid with the address and port PgBouncer connects from (what PostgreSQL sees as
    client_addr and client_port), not the address PgBouncer or the check dial: 127.0.0.2, ::1, a DNS name or a
    Unix socket on either side. A pid of another server has its own client port there: never this one's."""
    where = ServerAddress(frozenset({"127.0.0.1"}), 5432, False)  # the check dials 127.0.0.1
    pooler = Pooler(
        (
            server(100, "127.0.0.2", 5432, 40001),  # PgBouncer dials another address; connects from 127.0.0.1
            server(101, "::1", 5432, 40002, local_addr="::1"),
            server(102, "db.internal", 6543, 40003, local_addr="10.0.0.9"),  # a DNS name and a port map
            server(103, "unix", 5432, 6432, local_addr="unix", linked=True),  # over this server's socket
            server(104, "unix", 5433, 6432, local_addr="unix"),  # another server's socket: never this one
            server(105, "127.0.0.1", 5432, None),  # no port: cannot be told
        ),
        frozenset({("appdb", "app")}),
        PgbConfig(server_idle_timeout=600, server_lifetime=3600),
    )
    keys = pooler_keys([pooler], where)
    assert keys.own == tuple(
        sorted(
            [
                f"{100 * 65536 + 40001}@127.0.0.1",
                f"{100 * 65536 + 40001}@::ffff:127.0.0.1",
                f"{101 * 65536 + 40002}@::1",
                f"{102 * 65536 + 40003}@10.0.0.9",
                f"{102 * 65536 + 40003}@::ffff:10.0.0.9",
            ]
        )
    )
    assert keys.held == (f"{103 * 65536}@",)  # a session-mode client holds it; over a socket, the pid alone
    assert keys.pids == (100 * 65536 + 40001, 101 * 65536 + 40002, 102 * 65536 + 40003, 103 * 65536)
    # The same pid at another server has another client port (and maybe address): another identity.
    other = Pooler((server(100, "10.0.0.7", 5432, 40009),), frozenset(), pooler.config)
    assert f"{100 * 65536 + 40001}@127.0.0.1" not in pooler_keys([other], where).own
    # Several PgBouncers: every one's servers.
    both = pooler_keys([pooler, other], where)
    assert set(keys.own) < set(both.own) and f"{100 * 65536 + 40009}@127.0.0.1" in both.own


def test_pgbouncers_log_names_servers_by_the_address_it_dials():
    """PgBouncer's log says `appdb/app@127.0.0.2:5432`: the logins count for this server once PgBouncer's servers
    dialled there are found among its backends by their identity, whatever address the check uses; and, as
    always, where the check's own addresses name it (127.0.0.1), even in a run where PgBouncer has no server."""
    where = ServerAddress(frozenset({"127.0.0.1"}), 5432, False)
    here, elsewhere = server(100, "127.0.0.2", 5432, 40001), server(7, "10.0.0.9", 5432, 40002)
    pooler = Pooler((here, elsewhere), frozenset(), PgbConfig())
    found = (
        ActivityGroup("idle", "appdb", "app", "web", "", 1, pooler=POOLER_OWN, servers=((100 * 65536 + 40001, 3.0),)),
    )
    pg = PgSnapshot(ServerSettings(150000, "15", 100, 3, 0, 0, 0), found, None, 0.0, False)
    assert pooler.targets(pg) == {("127.0.0.2", 5432)}  # not 10.0.0.9: none of its servers is a backend here
    events = ServerEvents()
    events.feed(
        [
            "2026-12-07 LOG S-0x55d0: appdb/app@127.0.0.2:5432 new connection to server (from 127.0.0.1:40001)",
            "2026-12-07 LOG S-0x55d1: appdb/app@127.0.0.2:5432 closing because: server idle timeout (age=61s)",
            "2026-12-07 LOG S-0x55d2: other/app@10.0.0.9:5432 new connection to server (from 10.0.0.1:40001)",
            "2026-12-07 LOG S-0x55d3: appdb/app@127.0.0.1:5432 new connection to server (from 127.0.0.1:40003)",
        ]
    )
    assert events.of(where, pooler.targets(pg)) == (2.0, {"server idle timeout": 1.0})
    # No server found here this run (all closed): the check's own address still counts, the learnt one not yet.
    assert events.of(where, frozenset()) == (1.0, {})


def idle_servers(*idle: tuple[int, float]) -> tuple[tuple[int, float], ...]:
    """(key, seconds idle) of PgBouncer's servers as the PostgreSQL statement returns them: key pid * 65536 + port."""
    return tuple((pid * 65536 + 40000, seconds) for pid, seconds in idle)


def test_a_server_idle_far_past_server_idle_timeout_is_pgbouncers_anomaly():
    settings = parse({"postgres": {"host": "h", "username": "datadog", "dbname": "postgres"}, "pgbouncer": {}})
    own = idle_servers((1, 1300), (2, 1300), (3, 1300), (4, 10), (5, -1))
    groups = (
        ActivityGroup("idle", "appdb", "app", "web", "", 5, pooler=POOLER_OWN, servers=own),
        ActivityGroup("idle", "appdb", "app", "leaky", "", 2, leaked=2),
    )
    pg = PgSnapshot(ServerSettings(150000, "15", 100, 3, 0, 0, 0), groups, None, 0.0, False)
    config = PgbConfig(server_idle_timeout=600, server_lifetime=3600)
    servers = tuple(server(pid) for pid in range(1, 6))
    [finding] = overdue_findings(pg, Pooler(servers, frozenset(), config, tag="pgbouncer_server:p:1"), settings)
    assert finding.text.startswith("3 of PgBouncer's server connections idle at PostgreSQL for over 1200 s, far past")
    assert "server_idle_timeout=600 s" in finding.text and "not an application's leak" in finding.text
    assert "pools appdb/app 3" in finding.text
    assert (finding.code, finding.figure, finding.threshold) == ("pgbouncer_servers_overdue", 3, 1200)
    assert finding.server == "pgbouncer_server:p:1"
    assert finding.advice.startswith("PgBouncer should have closed them")
    # min_pool_size keeps some on purpose; timeouts off keep them all.
    kept = PgbConfig(server_idle_timeout=600, min_pool_size=3)
    assert overdue_findings(pg, Pooler(servers, frozenset(), kept), settings) == []
    [finding] = overdue_findings(pg, Pooler(servers, frozenset(), kept, {"appdb": 1}), settings)  # the database's own
    assert finding.text.startswith("2 of PgBouncer's server connections")
    assert overdue_findings(pg, Pooler(servers, frozenset(), PgbConfig(server_idle_timeout=0)), settings) == []


def test_overdue_servers_are_counted_pool_by_pool_under_pgbouncers_own_database_names():
    """min_pool_size is kept per pool: five healthy pools keeping theirs hide no other pool's stuck servers; and a
    PgBouncer alias (appdb_tx for PostgreSQL's appdb) is looked up under its own name."""
    settings = parse({"postgres": {"host": "h", "username": "datadog", "dbname": "postgres"}, "pgbouncer": {}})
    healthy = [server(pid, db=f"pool{pid}") for pid in range(1, 6)]  # one kept server each: min_pool_size 1
    stuck = [server(pid, db="appdb_tx") for pid in range(10, 14)]  # 4 idle far past, of a pool keeping 3
    own = idle_servers(*((pid, 5000) for pid in [*range(1, 6), *range(10, 14)]))
    groups = (ActivityGroup("idle", "appdb", "app", "web", "", 9, pooler=POOLER_OWN, servers=own),)
    pg = PgSnapshot(ServerSettings(150000, "15", 100, 3, 0, 0, 0), groups, None, 0.0, False)
    config = PgbConfig(server_idle_timeout=600, min_pool_size=1)
    pooler = Pooler((*healthy, *stuck), frozenset(), config, {"appdb_tx": 3})
    [finding] = overdue_findings(pg, pooler, settings)
    assert finding.figure == 1 and "pools " in finding.text and "appdb_tx/app 4" in finding.text
    # The alias's own min_pool_size of 4 keeps all four.
    assert overdue_findings(pg, Pooler((*healthy, *stuck), frozenset(), config, {"appdb_tx": 4}), settings) == []


SERVERS_1_15 = (
    "type user database state addr port local_addr local_port connect_time request_time wait wait_us close_needed "
    "ptr link remote_pid tls"
).split()
SERVERS_1_24 = (
    "type user database replication state addr port local_addr local_port connect_time request_time wait wait_us "
    "close_needed ptr link remote_pid tls application_name prepared_statements id"
).split()


@pytest.mark.parametrize("columns", [SERVERS_1_15, [*SERVERS_1_15, "application_name"], SERVERS_1_24])
def test_show_servers_is_read_by_column_name_from_1_15_to_1_26(columns):
    values = {
        "type": "S", "user": "app", "database": "appdb", "state": "active", "addr": "127.0.0.1", "port": 5432,
        "local_addr": "127.0.0.1", "local_port": 40001, "link": "0x55d0", "remote_pid": 4242,
        "application_name": "web", "replication": "none", "id": 7,
    }  # fmt: skip
    rows = [dict(values), {**values, "database": "pgbouncer", "remote_pid": 1}]
    result = Result(columns, [tuple(row.get(c) for c in columns) for row in rows])
    [found] = parse_servers(result)
    app = "web" if "application_name" in columns else ""
    assert found == PgbServer("appdb", "app", "active", "127.0.0.1", 5432, 40001, 4242, True, app, "127.0.0.1")


# -- churn named by who opens it (pure: the window's figures) ------------------------------------------


def churn_settings(**options: object):
    return parse({"postgres": {"host": "h", "username": "datadog", "dbname": "postgres"}, "pgbouncer": {}, **options})


def window_of(*samples: Sample):
    window = ChurnWindow()
    found = None
    for sample in samples:
        found = window.add(sample)
    assert found is not None
    return found


def test_pgbouncers_nameless_logins_are_pgbouncers_and_figures_never_exceed_the_churn():
    """The issue's case, without PgBouncer's log: PostgreSQL's log says 143 logins without a name; the runs saw
    PgBouncer's servers (named `web` by their last client) started, never a nameless direct connection."""
    start = Sample(0.0, 0, 9, {POOLER: 8, "": 0})
    end = Sample(
        60.0, 147, 9, {POOLER: 8},
        {"log": {"": 143, "datadog-django-db": 0}, "sampled": {POOLER: 67}},
    )  # fmt: skip
    churn = window_of(start, end)
    assert churn.per_minute == 147
    assert churn.by_app == ((POOLER, 143.0, "log"),)  # not app=none 143 and web 67 besides
    # PgBouncer's log, when followed, counts its logins itself; a nameless direct client keeps the rest.
    end = Sample(60.0, 147, 9, {POOLER: 8}, {"pgbouncer_log": {POOLER: 130}, "log": {"": 143}})
    assert window_of(start, end).by_app == ((POOLER, 130.0, "pgbouncer_log"), ("", 13.0, "log"))
    # Sources that overlap are capped at the churn: the best first.
    end = Sample(60.0, 100, 9, {POOLER: 8}, {"pgbouncer_log": {POOLER: 90}, "django": {"api": 60}})
    by_app = window_of(start, end).by_app
    assert by_app == ((POOLER, 90.0, "pgbouncer_log"), ("api", 10.0, "django"))
    assert sum(rate for _, rate, _ in by_app) <= 100


def test_pgbouncers_churn_is_its_settings_not_conn_max_age():
    settings = churn_settings(conn_max_age=60)
    churn = Churn(150, 60, 150, 0, ((POOLER, 150.0, "log"),), servers=5)
    config = PgbConfig(server_lifetime=2, server_idle_timeout=600)
    finding = churn_finding(churn, settings, settings.thresholds.churn_per_minute, pooler=config)
    assert finding.text.startswith("150 connections a minute opened and closed again (churn, over 60 s): PgBouncer 150")
    assert finding.subjects == (Subject(("pooler:pgbouncer",), 150.0),)
    assert finding.advice.startswith(
        "PgBouncer opens them: it closes its server connections after server_lifetime=2 s: raise server_lifetime"
    )
    assert "CONN_MAX_AGE" not in finding.line() and "server_idle_timeout" not in finding.line()
    # Its own log says why, when followed.
    told = Churn(150, 60, 150, 0, ((POOLER, 150.0, "pgbouncer_log"),), reasons=(("server idle timeout", 148),))
    text = churn_finding(told, settings, settings.thresholds.churn_per_minute, pooler=config).advice
    assert "after server_idle_timeout=600 s (`closing because: server idle timeout` 148 times in its log)" in text
    # Timeouts that cannot explain it: its log can.
    slow = PgbConfig(server_lifetime=3600, server_idle_timeout=600)
    text = churn_finding(churn, settings, settings.thresholds.churn_per_minute, pooler=slow).advice
    assert "for another reason than its timeouts: follow PgBouncer's log" in text


def test_short_lived_connections_with_conn_max_age_set_name_processes_that_exit():
    settings = churn_settings(conn_max_age=0, apps=[{"match": "^web$", "conn_max_age": 60}])
    churn = Churn(150, 60, 150, 0, (("web", 150.0, "log"),), lifetimes={"web": 0.36})
    text = churn_finding(churn, settings, settings.thresholds.churn_per_minute).advice
    assert "app=web's connections lived about 0.36 s on average, far short of its CONN_MAX_AGE=60 s: processes " in (
        text
    )
    assert "gunicorn max_requests, Celery max_tasks_per_child, autoscaling" in text and "set CONN_MAX_AGE" not in text
    # CONN_MAX_AGE=0 (the instance's, for an application without a profile): the advice is to set it.
    other = Churn(150, 60, 150, 0, (("beat", 150.0, "log"),))
    assert (
        "set CONN_MAX_AGE (with CONN_HEALTH_CHECKS) or pool"
        in churn_finding(other, settings, settings.thresholds.churn_per_minute).advice
    )


def test_every_advice_fits_the_conn_max_age_configured():
    """max_client_conn does not blame CONN_MAX_AGE=None on applications set to 15; reserved slots do not ask to
    lower a CONN_MAX_AGE that is 0; the processes' own churn with CONN_MAX_AGE set names what ends them."""
    seen = [("max_client_conn", "pgbouncer", "pgbouncer_server:h:6432"), ("reserved_slots", "postgres", "p")]
    fifteen = message(signature_findings(seen, settings=churn_settings(conn_max_age=15)))
    assert "CONN_MAX_AGE=None" not in fifteen and "lower CONN_MAX_AGE" in fifteen
    assert "(leaks, threads or processes that keep connections they no longer use)" in fifteen
    persistent = churn_settings(conn_max_age=15, apps=[{"match": "^celery$", "conn_max_age": None}])
    assert "(leaks, CONN_MAX_AGE=None)" in message(signature_findings(seen, settings=persistent))
    zero = message(signature_findings(seen, settings=churn_settings(conn_max_age=0)))
    assert "lower CONN_MAX_AGE" not in zero and "Close idle or leaked connections, or pool through PgBouncer" in zero

    history = DjangoHistory()
    history.update([DjangoScrape("u", "web", 0.0, (DjangoAlias("default", new_connections=0),))])
    for t in (15.0, 30.0, 45.0, 60.0):
        run = history.update([DjangoScrape("u", "web", t, (DjangoAlias("default", new_connections=10 * t),))])
    threshold = churn_settings().thresholds.churn_per_minute
    [churn] = [f for f in django_findings(run, threshold, (), churn_settings(conn_max_age=60)) if "opened" in f.text]
    assert "app=web opened 600 new connections a minute" in churn.text
    assert "app=web's connections end far short of its CONN_MAX_AGE=60 s: processes that exit" in churn.advice
    assert "set CONN_MAX_AGE" not in churn.advice
    [churn] = [f for f in django_findings(run, threshold, (), churn_settings()) if "opened" in f.text]
    assert "set CONN_MAX_AGE (with CONN_HEALTH_CHECKS)" in churn.advice  # 0, Django's default
