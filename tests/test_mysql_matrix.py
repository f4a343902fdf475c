"""The MySQL side on each server users run: MariaDB 10.5, 10.11 (the machine's own) and 11.8, Oracle MySQL 9.7.

MariaDB 10.5 comes from Debian bullseye, 11.8 from trixie, MySQL 9.7 from sid's `mysql-server-core`,
fetched once by django_db_tools.debian into the user's cache; one live server each, a few fast tests
each; the whole suite runs on 10.11. DJANGO_DB_LEAVE_OUT=mysql-9.7,... leaves versions out (reported
as skipped); a version that cannot be fetched fails its tests, naming the suite and package.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pymysql
import pytest
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools import debian
from django_db_tools.mariadb import MONITOR_PASSWORD, MariaDB

from .conftest import APP_PASSWORD, VERSIONS_RAN, matrix, metric_values, one_value
from .test_mysql import DjangoApp

MACHINE = "mariadb-10.11"  # what `apt-get install mariadb-server` gives on Debian 12
SERVERS = ("mariadb-10.5", MACHINE, "mariadb-11.8", "mysql-9.7")
HEALTH = "django_db.connection_health"
ALIGNMENT = "django_db.config_alignment"
CAN_CONNECT = "django_db.mysql.can_connect"
MAX_CONNECTIONS = 20


@dataclass
class Server:
    name: str  # "mariadb-10.5"
    db: MariaDB

    @property
    def tag(self) -> str:
        return f"mysql_server:127.0.0.1:{self.db.port}"

    def instance(self, **options: object) -> dict:
        return {"mysql": self.db.instance(), **options}

    def connect(self, **kwargs: object) -> pymysql.Connection:
        return pymysql.connect(
            host="127.0.0.1", port=self.db.port, user="app", password=APP_PASSWORD, database="appdb",
            autocommit=True, connect_timeout=5, **kwargs,
        )  # fmt: skip

    def status(self, name: str) -> int:
        return int(self.db.sql(f"SHOW GLOBAL STATUS LIKE '{name}'").split()[1])

    def set_global(self, name: str, value: object) -> None:
        self.db.sql(f"SET GLOBAL {name} = {value}")


@pytest.fixture(scope="module", params=matrix(SERVERS))
def server(request) -> Iterator[Server]:
    name = request.param
    with contextlib.ExitStack() as stack:
        build = None
        if name != MACHINE:
            fetched = debian.fetch(debian.MYSQL[name])  # a failure names the suite and package
            build = stack.enter_context(debian.runnable(fetched))
        db = stack.enter_context(MariaDB(max_connections=MAX_CONNECTIONS, build=build))
        db.create_app("app", APP_PASSWORD, "appdb")
        db.sql("CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(50)) ENGINE=InnoDB;", "appdb")
        db.sql("INSERT INTO items VALUES (1, 'one');", "appdb")
        VERSIONS_RAN[name] = db.version
        yield Server(name, db)


@pytest.fixture
def conns() -> Iterator[list]:
    held: list = []
    yield held
    for conn in held:
        with contextlib.suppress(pymysql.err.Error):
            conn.close()


def _service_check(aggregator, name: str):
    (found,) = aggregator.service_checks(name)
    return found


def _wait_for_transaction(server: Server) -> None:
    """Until INNODB_TRX shows a transaction: InnoDB serves that table from a cache it fills again only
    when it has not been read for 0.1 s, so a read just after another one (the previous test's check)
    may not show it yet."""
    deadline = time.monotonic() + 5
    while server.db.sql("SELECT COUNT(*) FROM information_schema.INNODB_TRX").strip() == "0":
        assert time.monotonic() < deadline, "the transaction never showed in INNODB_TRX"
        time.sleep(0.15)  # InnoDB fills the cache again only once nobody has read it for 0.1 s


def test_runs_the_version_asked_for(aggregator, dd_run_check, server):
    version = server.db.version
    print(f"\n[{server.name}] SELECT VERSION(): {version}")
    family, number = server.name.split("-")
    assert version.startswith(f"{number}.")
    assert ("MariaDB" in version) == (family == "mariadb")
    check = DjangoDbCheck("django_db", {}, [server.instance()])
    dd_run_check(check)
    check.cancel()
    aggregator.assert_service_check(CAN_CONNECT, AgentCheck.OK)
    assert one_value(aggregator, "django_db.mysql.max_connections", server.tag) == MAX_CONNECTIONS
    # Each family's default, so the process list is read from performance_schema on MySQL and from
    # information_schema on MariaDB in the tests that follow.
    assert server.db.sql("SELECT @@GLOBAL.performance_schema").strip() == ("1" if family == "mysql" else "0")


WITHOUT_CRYPTOGRAPHY = """
import sys
sys.modules["cryptography"] = None  # as in a virtualenv without it
import pymysql
try:
    pymysql.connect(host="127.0.0.1", port=int(sys.argv[1]), user="datadog", password=sys.argv[2]).close()
except Exception as e:
    print(repr(e))
else:
    print("connected")
"""


def test_what_authentication_needs_of_the_driver(server):
    """MySQL's caching_sha2_password needs PyMySQL's `cryptography` for a full authentication over TCP
    without TLS (the Agent embeds it); MariaDB's mysql_native_password needs nothing more."""
    plugin = server.db.sql("SELECT plugin FROM mysql.user WHERE user = 'datadog'").strip()
    server.db.sql("FLUSH PRIVILEGES")  # MySQL forgets the logins it cached: the next one is a full authentication
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_CRYPTOGRAPHY, str(server.db.port), MONITOR_PASSWORD],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    print(f"\n[{server.name}] {plugin}, without cryptography: {result.stdout.strip()}")
    if server.name.startswith("mysql"):
        assert plugin == "caching_sha2_password"
        assert "'cryptography' package is required" in result.stdout, result
    else:
        assert plugin == "mysql_native_password"
        assert result.stdout.strip() == "connected", result


def test_connections_by_state_user_and_host_and_utilisation(aggregator, dd_run_check, server, conns):
    conns += [server.connect() for _ in range(3)]
    in_transaction = conns[0].cursor()
    in_transaction.execute("BEGIN")
    in_transaction.execute("UPDATE items SET name = name WHERE id = 1")  # a row in INNODB_TRX
    _wait_for_transaction(server)
    time.sleep(1.1)  # the transaction's age counts whole seconds, and a 0 is not sent
    check = DjangoDbCheck("django_db", {}, [server.instance(group_by=["db", "user", "client_addr"])])
    dd_run_check(check)
    base = (server.tag, "db:appdb", "user:app", "client_host:127.0.0.1")
    figures = {
        state: metric_values(aggregator, "django_db.mysql.connections", *base, f"state:{state}")
        for state in ("idle", "idle_in_transaction", "active")
    }
    print(f"\n[{server.name}] app by state: {figures}")
    assert figures == {"idle": [2], "idle_in_transaction": [1], "active": []}
    assert not metric_values(aggregator, "django_db.mysql.connections", "user:datadog")  # the check's own
    assert one_value(aggregator, "django_db.mysql.transaction.max_age", server.tag, "db:appdb", "user:app") >= 1
    threads = server.status("Threads_connected") - 1  # less the root session asking
    utilisation = one_value(aggregator, "django_db.mysql.connection_utilization", server.tag)
    assert utilisation == pytest.approx(threads / MAX_CONNECTIONS)
    assert one_value(aggregator, "django_db.mysql.connections_available", server.tag) == MAX_CONNECTIONS - threads
    check.cancel()


def test_too_many_connections_refused_with_1040(aggregator, dd_run_check, server, conns):
    check = DjangoDbCheck("django_db", {}, [server.instance()])
    try:
        dd_run_check(check)  # holds one connection from now on
        refusal = None
        for _ in range(MAX_CONNECTIONS + 1):
            try:
                conns.append(server.connect())
            except pymysql.err.OperationalError as e:
                refusal = e
                break
        assert refusal is not None and refusal.args[0] == 1040, refusal
        print(f"\n[{server.name}] {refusal.args}")
        aggregator.reset()
        dd_run_check(check)
        health = _service_check(aggregator, HEALTH)
        assert health.status == AgentCheck.CRITICAL
        assert f"of {MAX_CONNECTIONS} MySQL connections in use" in health.message or (
            f"MySQL connections for max_connections={MAX_CONNECTIONS}" in health.message
        ), health.message
        assert one_value(aggregator, "django_db.mysql.connections_available", server.tag) == 0

        aggregator.reset()
        fresh = DjangoDbCheck("django_db", {}, [server.instance()])  # a new connection is refused too
        dd_run_check(fresh)
        fresh.cancel()
        message = _service_check(aggregator, CAN_CONNECT).message
        assert "mysql_too_many_connections: (1040, 'Too many connections')" in message, message
        assert sum(metric_values(aggregator, "django_db.errors", "signature:mysql_too_many_connections")) == 1
    finally:
        check.cancel()
        for conn in conns:
            conn.close()
        conns.clear()


def test_wait_timeout_alignment_and_reconnect(aggregator, dd_run_check, server, conns):
    server.set_global("wait_timeout", 1)
    try:
        check = DjangoDbCheck("django_db", {}, [server.instance(conn_max_age=60)])
        conns.append(server.connect())  # takes wait_timeout=1 from the global value
        dd_run_check(check)
        alignment = _service_check(aggregator, ALIGNMENT)
        assert alignment.status == AgentCheck.WARNING
        assert "conn_max_age=60 s is longer than MySQL's wait_timeout=1 s for user app" in alignment.message
        first = check.mysql.conn.thread_id()
        time.sleep(1.6)  # the server closes both idle connections: the application's and the check's
        with pytest.raises(pymysql.err.OperationalError) as gone:
            conns[0].cursor().execute("SELECT 1")
        print(f"\n[{server.name}] after wait_timeout: {gone.value.args}")
        # Whichever the client meets first: the socket reset (2006), closed (2013), or MySQL's reason (4031).
        assert gone.value.args[0] in (2006, 2013, 4031), gone.value.args
        aggregator.reset()
        dd_run_check(check)
        aggregator.assert_service_check(CAN_CONNECT, AgentCheck.OK)
        assert check.mysql.conn.thread_id() != first  # opened again at once, no page
        # ... and what closed it counted once, with the server's tag, as on the PostgreSQL side
        assert metric_values(
            aggregator, "django_db.errors", server.tag, "source:mysql", "signature:mysql_server_gone"
        ) == [1]
        assert len(aggregator.metrics("django_db.errors")) == 1
        check.cancel()
    finally:
        server.set_global("wait_timeout", 28800)


def test_a_killed_connection_is_opened_again(aggregator, dd_run_check, server):
    check = DjangoDbCheck("django_db", {}, [server.instance()])
    try:
        dd_run_check(check)
        first = check.mysql.conn.thread_id()
        server.db.sql(f"KILL {first}")
        aggregator.reset()
        dd_run_check(check)
        aggregator.assert_service_check(CAN_CONNECT, AgentCheck.OK)
        assert check.mysql.conn.thread_id() != first
        assert _service_check(aggregator, HEALTH).status == AgentCheck.OK
    finally:
        check.cancel()


def test_a_django_application_leak(aggregator, dd_run_check, server, tmp_path):
    app = DjangoApp(server.db, tmp_path / "django.log", conn_max_age=None, threads=3)  # CONN_MAX_AGE=None
    check = DjangoDbCheck("django_db", {}, [server.instance(leak_idle_seconds=1)])
    try:
        assert app.concurrently("/items", 3) == [200] * 3  # each worker thread keeps the connection it opened
        time.sleep(1.2)
        dd_run_check(check)
        kept = one_value(aggregator, "django_db.mysql.connections", server.tag, "state:idle")
        leaked = one_value(aggregator, "django_db.mysql.leaked_connections", "db:appdb", "user:app")
        print(f"\n[{server.name}] Django: {kept:g} connections kept, {leaked:g} leaked")
        assert 1 <= leaked == kept <= 3
        health = _service_check(aggregator, HEALTH)
        assert health.status == AgentCheck.WARNING
        assert f"{leaked:g} MySQL connections idle for over 1 s (leaked): user=app {leaked:g}" in health.message
    finally:
        check.cancel()
        app.stop()


# Last in this module: the server is restarted, then stopped.
def test_restart_then_stopped_server(aggregator, dd_run_check, server, caplog):
    caplog.set_level(logging.INFO)
    check = DjangoDbCheck("django_db", {}, [server.instance(connect_timeout=2, query_timeout=2)])
    try:
        dd_run_check(check)
        time.sleep(2)  # Uptime counts whole seconds: the restarted server's falls short of it by more than 2
        server.db.stop()  # a clean shutdown: MariaDB 10.5 tells idle clients 1927, the others 2013
        server.db.start_again()
        aggregator.reset()
        dd_run_check(check)  # the kept connection is gone: a new one, no page
        assert caplog.text.count(" restarted (its Uptime went back to ") == 1, caplog.text
        aggregator.assert_service_check(CAN_CONNECT, AgentCheck.OK)
        assert _service_check(aggregator, HEALTH).status == AgentCheck.OK
        lost = [m.value for m in aggregator.metrics("django_db.errors")]
        assert lost == [1] and metric_values(aggregator, "django_db.errors", "signature:mysql_server_gone") == [1]

        server.db.stop()
        aggregator.reset()
        dd_run_check(check)
        found = _service_check(aggregator, CAN_CONNECT)
        print(f"\n[{server.name}] stopped: {found.message}")
        assert found.status == AgentCheck.CRITICAL
        assert "mysql_cannot_connect" in found.message, found.message
        counted = {
            tuple(t for t in m.tags if t.startswith(("signature:", "source:"))): m.value
            for m in aggregator.metrics("django_db.errors")
        }
        # The kept connection the shutdown closed, then the refusal of a new one: two facts, each once.
        assert counted == {
            ("signature:mysql_server_gone", "source:mysql"): 1,
            ("signature:mysql_cannot_connect", "source:mysql"): 1,
        }, counted
    finally:
        check.cancel()
