"""The MySQL side against a real MariaDB, and a real Django application on it through PyMySQL."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest
from datadog_checks.base import AgentCheck
from datadog_checks.dev.utils import get_metadata_metrics

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.mariadb import MariaDB

from .conftest import APP_PASSWORD, metric_values, one_value, timed_critical_run

HEALTH = "django_db.connection_health"
ALIGNMENT = "django_db.config_alignment"
CAN_CONNECT = "django_db.mysql.can_connect"
ROOT = Path(__file__).resolve().parent.parent


def service_check(aggregator, name):
    checks = aggregator.service_checks(name)
    assert len(checks) == 1, checks
    print(f"\n{name} [{checks[0].status}] {checks[0].message}")  # shown with -s: what an operator reads
    return checks[0]


def errors(aggregator, signature, source):
    return sum(metric_values(aggregator, "django_db.errors", f"signature:{signature}", f"source:{source}"))


@pytest.fixture
def server_globals(mariadb: MariaDB) -> Iterator[dict[str, str]]:
    """SET GLOBAL values for one test, put back afterwards (root has the extra connection even when full)."""
    changed: dict[str, str] = {}

    def put(name: str, value: object) -> None:
        if name not in changed:
            changed[name] = mariadb.sql(f"SELECT @@GLOBAL.{name}").strip()
        mariadb.sql(f"SET GLOBAL {name} = {value}")

    yield put  # type: ignore[misc]
    for name, value in changed.items():
        mariadb.sql(f"SET GLOBAL {name} = {value}")


@pytest.fixture
def app_conns(mariadb: MariaDB) -> Iterator[list]:
    conns: list = []
    yield conns
    for conn in conns:
        conn.close()


def app_connect(mariadb: MariaDB, **kwargs: object):
    return pymysql.connect(
        host="127.0.0.1", port=mariadb.port, user="app", password=APP_PASSWORD, database="appdb",
        autocommit=True, connect_timeout=5, **kwargs,
    )  # fmt: skip


def mysql_instance(mariadb: MariaDB, **options: object) -> dict:
    return {"mysql": mariadb.instance(), "tags": ["env_name:test"], **options}


class DjangoApp:
    """The Django application of django_db_tools.mysql_app in its own process."""

    def __init__(self, mariadb: MariaDB, log: Path, conn_max_age: int | None, threads: int = 16):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "django_db_tools.mysql_app", "--port", str(mariadb.port), "--user", "app",
             "--password", APP_PASSWORD, "--database", "appdb", "--conn-max-age", str(conn_max_age),
             "--threads", str(threads), "--log", str(log)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"the Django application did not start: {line}{self.proc.stderr.read()}")
        self.url = f"http://127.0.0.1:{int(line.split()[-1])}"

    def get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:  # noqa: S310 - our own server
                return int(response.status)
        except urllib.error.HTTPError as e:
            return e.code

    def concurrently(self, path: str, count: int) -> list[int]:
        codes: list[int] = []
        threads = [threading.Thread(target=lambda: codes.append(self.get(path))) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return codes

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=30)


@pytest.fixture
def django_app(mariadb: MariaDB, tmp_path: Path) -> Iterator:
    apps: list[DjangoApp] = []

    def start(conn_max_age: int | None, threads: int = 16) -> DjangoApp:
        apps.append(DjangoApp(mariadb, tmp_path / "django.log", conn_max_age, threads))
        return apps[-1]

    yield start
    for app in apps:
        app.stop()


def test_the_check_never_imports_pymysql_without_a_mysql_section():
    code = (
        "import sys\n"
        "from datadog_checks.django_db import DjangoDbCheck\n"
        "DjangoDbCheck('django_db', {}, [{'postgres': {'host': '127.0.0.1', 'port': 1}}])\n"
        "assert 'pymysql' not in sys.modules, 'pymysql imported'\n"
        "DjangoDbCheck('django_db', {}, [{'mysql': {'host': '127.0.0.1', 'port': 1}}])\n"
        "assert 'pymysql' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_connections_by_state_user_db_and_host(aggregator, dd_run_check, mariadb, app_conns):
    app_conns += [app_connect(mariadb) for _ in range(3)]
    in_transaction = app_conns[0].cursor()
    in_transaction.execute("BEGIN")
    in_transaction.execute("UPDATE items SET name = name WHERE id = 1")
    time.sleep(1.1)  # ages count whole seconds, and a 0 is not sent: the transaction's, the idle ones' (leaks)
    instance = mysql_instance(mariadb, group_by=["db", "user", "client_addr"], leak_idle_seconds=1)
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)

    server = f"mysql_server:127.0.0.1:{mariadb.port}"
    base = (server, "env_name:test", "db:appdb", "user:app", "client_host:127.0.0.1")
    assert one_value(aggregator, "django_db.mysql.connections", *base, "state:idle") == 2
    assert one_value(aggregator, "django_db.mysql.connections", *base, "state:idle_in_transaction") == 1
    # The check's own connection is left out of the groups, but counts in Threads_connected.
    assert not metric_values(aggregator, "django_db.mysql.connections", "user:datadog")
    threads_connected = int(mariadb.sql("SHOW GLOBAL STATUS LIKE 'Threads_connected'").split()[1])
    max_connections = one_value(aggregator, "django_db.mysql.max_connections", server)
    assert max_connections == 100
    utilization = one_value(aggregator, "django_db.mysql.connection_utilization", server)
    assert utilization == pytest.approx((threads_connected - 1) / 100)  # less the root session asking
    assert (
        one_value(aggregator, "db.client.connections.usage", "state:idle", f"pool.name:127.0.0.1:{mariadb.port}/appdb")
        == 2
    )
    assert one_value(aggregator, "django_db.mysql.transaction.max_age", server, "db:appdb", "user:app") >= 1
    aggregator.assert_service_check(CAN_CONNECT, AgentCheck.OK, tags=[server, "env_name:test"])
    aggregator.assert_metrics_using_metadata(get_metadata_metrics(), exclude=["db.client.connections.usage"])
    mysql_rows = {name for name in get_metadata_metrics() if name.startswith("django_db.mysql.")}
    assert mysql_rows - set(aggregator.metric_names) == set()
    check.cancel()


def test_a_leak_and_a_long_transaction_by_user(aggregator, dd_run_check, mariadb, app_conns):
    app_conns += [app_connect(mariadb) for _ in range(2)]
    held = app_connect(mariadb)
    app_conns.append(held)
    cursor = held.cursor()
    cursor.execute("BEGIN")
    cursor.execute("UPDATE items SET name = name WHERE id = 1")
    instance = mysql_instance(
        mariadb, leak_idle_seconds=1, thresholds={"idle_in_transaction_seconds": {"warning": 1, "critical": 600}}
    )
    check = DjangoDbCheck("django_db", {}, [instance])
    time.sleep(2.2)
    dd_run_check(check)
    leaked = one_value(aggregator, "django_db.mysql.leaked_connections", "db:appdb", "user:app")
    assert leaked == 2  # the connection in a transaction is not a leak
    assert one_value(aggregator, "django_db.mysql.transaction.max_age", "db:appdb", "user:app") >= 2
    health = service_check(aggregator, HEALTH)
    assert health.status == AgentCheck.WARNING
    assert "2 MySQL connections idle for over 1 s (leaked): user=app 2" in health.message
    assert "the oldest MySQL transaction, of user=app on db=appdb from 127.0.0.1, has been open for" in health.message
    check.cancel()


def test_saturated_mariadb(aggregator, dd_run_check, mariadb, server_globals, django_app):
    app = django_app(None, threads=16)  # CONN_MAX_AGE=None: each worker thread keeps its connection
    instance = mysql_instance(mariadb, conn_max_age=None, log_files=[str(app.log)])
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)  # the check holds its connection from now on; the log is followed from its end
    server_globals("max_connections", 10)  # MariaDB's smallest
    codes = app.concurrently("/hold?seconds=1.5", 16)
    refused = codes.count(500)
    assert refused and 200 in codes, codes  # refused with 1040 past max_connections
    with pytest.raises(pymysql.err.OperationalError, match="1040"):
        app_connect(mariadb)

    aggregator.reset()
    dd_run_check(check)
    health = service_check(aggregator, HEALTH)
    assert health.status == AgentCheck.CRITICAL
    # Full: max_connections taken, or the one more the server admits past it (the last login is refused
    # after authentication, so it may be counted for a moment).
    assert re.search(
        r"CRITICAL: (10 of 10 MySQL connections in use \(100% of max_connections|11 MySQL connections for "
        r"max_connections=10 \(110%); most: user=app (9|10)\)",
        health.message,
    ), health.message
    assert f"CRITICAL: mysql_too_many_connections seen ({refused} from log)" in health.message
    assert errors(aggregator, "mysql_too_many_connections", "log") == refused  # once per refusal
    assert one_value(aggregator, "django_db.mysql.connections_available", f"mysql_server:127.0.0.1:{mariadb.port}") == 0

    aggregator.reset()
    dd_run_check(DjangoDbCheck("django_db", {}, [mysql_instance(mariadb)]))  # a new check is refused too
    message = service_check(aggregator, CAN_CONNECT).message
    assert "mysql_too_many_connections: (1040, 'Too many connections')" in message
    assert "raise max_connections" in message
    assert errors(aggregator, "mysql_too_many_connections", "mysql") == 1
    check.cancel()


def test_wait_timeout_alignment(aggregator, dd_run_check, mariadb, server_globals, django_app):
    server_globals("wait_timeout", 2)
    app = django_app(60)  # CONN_MAX_AGE=60 without CONN_HEALTH_CHECKS
    check = DjangoDbCheck("django_db", {}, [mysql_instance(mariadb, conn_max_age=60, log_files=[str(app.log)])])
    assert app.get("/items") == 200
    dd_run_check(check)  # the log follower starts at the end of the log; the check connects
    time.sleep(3)  # the server closes every connection idle for 2 s: the application's and the check's
    assert app.get("/items") == 500  # (2006, 'MySQL server has gone away') on the reused connection
    aggregator.reset()
    dd_run_check(check)
    # The check's own connection was closed too: opened again at once, no CRITICAL, counted once.
    aggregator.assert_service_check(CAN_CONNECT, AgentCheck.OK)
    assert errors(aggregator, "mysql_server_gone", "mysql") == 1
    assert errors(aggregator, "mysql_server_gone", "log") >= 1
    alignment = service_check(aggregator, ALIGNMENT)
    assert alignment.status == AgentCheck.WARNING
    assert "conn_max_age=60 s is longer than MySQL's wait_timeout=2 s for user app" in alignment.message
    check.cancel()


def test_a_connection_killed_between_runs_is_counted_once(aggregator, dd_run_check, mariadb):
    """The same contract as the PostgreSQL and PgBouncer sources: the kept connection found broken is
    opened again at once, the run reports, and what broke it is counted once with the server's tag."""
    server = f"mysql_server:127.0.0.1:{mariadb.port}"
    check = DjangoDbCheck("django_db", {}, [mysql_instance(mariadb)])
    dd_run_check(check)
    killed = check.mysql.conn.thread_id()
    mariadb.sql(f"KILL {killed}")
    aggregator.reset()
    dd_run_check(check)
    aggregator.assert_service_check(CAN_CONNECT, AgentCheck.OK, tags=[server, "env_name:test"])
    assert check.mysql.conn.thread_id() != killed
    (lost,) = [m for m in aggregator.metrics("django_db.errors")]
    assert lost.value == 1 and server in lost.tags and "source:mysql" in lost.tags
    assert "signature:mysql_server_gone" in lost.tags
    assert service_check(aggregator, HEALTH).status == AgentCheck.OK
    aggregator.reset()
    dd_run_check(check)  # counted once: the next run has nothing to count
    assert aggregator.metrics("django_db.errors") == []
    check.cancel()


def test_alignment_ok_when_conn_max_age_fits(aggregator, dd_run_check, mariadb):
    check = DjangoDbCheck("django_db", {}, [mysql_instance(mariadb, conn_max_age=60)])
    dd_run_check(check)
    aggregator.assert_service_check(ALIGNMENT, AgentCheck.OK)
    check.cancel()


def test_refused_logins_counted_from_the_server_error_log(aggregator, dd_run_check, mariadb):
    check = DjangoDbCheck("django_db", {}, [mysql_instance(mariadb, log_files=[str(mariadb.logfile)])])
    dd_run_check(check)  # the error log is followed from its end
    for _ in range(2):
        with pytest.raises(pymysql.err.OperationalError, match="1045"):
            pymysql.connect(host="127.0.0.1", port=mariadb.port, user="app", password="wrong", connect_timeout=5)
    aggregator.reset()
    dd_run_check(check)
    assert errors(aggregator, "mysql_access_denied", "log") == 2
    check.cancel()


def test_wrong_password_and_nothing_listening(aggregator, dd_run_check, mariadb):
    denied = DjangoDbCheck("django_db", {}, [{"mysql": {**mariadb.instance(), "password": "wrong"}}])
    dd_run_check(denied)
    message = service_check(aggregator, CAN_CONNECT).message
    assert "mysql_access_denied" in message and "wrong" not in message

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    aggregator.reset()
    dd_run_check(DjangoDbCheck("django_db", {}, [{"mysql": {"host": "127.0.0.1", "port": port}}]))
    assert "mysql_cannot_connect" in service_check(aggregator, CAN_CONNECT).message


def test_a_hung_server_gives_critical_within_the_timeouts(aggregator, dd_run_check):
    with socket.socket() as hung:  # accepts TCP connections and never says a word
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        instance = {"mysql": {"host": "127.0.0.1", "port": hung.getsockname()[1], "connect_timeout": 1,
                              "query_timeout": 1}}  # fmt: skip
        check = DjangoDbCheck("django_db", {}, [instance])
        elapsed, message = timed_critical_run(aggregator, dd_run_check, check, CAN_CONNECT)
    assert "timeout expired" in message and "connect_timeout" in message
    assert elapsed < 5
