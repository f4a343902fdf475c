"""Real PostgreSQL 15, PgBouncer and MariaDB processes for the suite, started once per session."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.mariadb import MariaDB
from django_db_tools.sandbox import Sandbox
from django_db_tools.webapp.harness import Database, Webapp

# The stubs refuse tags such as `version`; the check submits none, the dashboards rely on that.
os.environ.setdefault("DDEV_SKIP_GENERIC_TAGS_CHECK", "true")

APP_PASSWORD = "app-secret"

# The version matrices (PgBouncer, MariaDB, MySQL) run every version they name unless this lists
# some to leave out, e.g. DJANGO_DB_LEAVE_OUT=pgbouncer-1.26,mysql-9.7: those are reported as skipped.
LEAVE_OUT = "DJANGO_DB_LEAVE_OUT"
# What each server of a matrix said it was, printed at the end of the test report.
VERSIONS_RAN: dict[str, str] = {}


def matrix(names: tuple[str, ...]) -> list:
    """Parameters for a module's version fixture: every name, less those DJANGO_DB_LEAVE_OUT lists."""
    left_out = {name.strip() for name in os.environ.get(LEAVE_OUT, "").split(",") if name.strip()}
    return [
        pytest.param(name, id=name, marks=[pytest.mark.skip(reason=f"left out by {LEAVE_OUT}")])
        if name in left_out
        else pytest.param(name, id=name)
        for name in names
    ]


def pytest_terminal_summary(terminalreporter) -> None:
    if VERSIONS_RAN:
        terminalreporter.write_sep("-", "server versions run")
        for name, version in sorted(VERSIONS_RAN.items()):
            terminalreporter.write_line(f"{name}: {version}")


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(max_connections=100, default_pool_size=5) as box:
        box.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}';CREATE ROLE plain LOGIN PASSWORD '{APP_PASSWORD}';")
        box.psql("CREATE DATABASE appdb OWNER app")
        box.psql("CREATE DATABASE otherdb OWNER app")
        box.psql("CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'one');", "appdb")
        box.psql("GRANT ALL ON items TO app;", "appdb")
        box.pgbouncer.users["app"] = APP_PASSWORD
        box.pgbouncer.reload()
        yield box


@pytest.fixture
def pg_instance(sandbox: Sandbox) -> dict:
    return {
        "postgres": sandbox.postgres.instance(Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD),
        "tags": ["env_name:test"],
    }


class Clients:
    """Connections a test opens; all closed when the test ends."""

    def __init__(self, sandbox: Sandbox):
        self.sandbox = sandbox
        self.open: list[psycopg.Connection] = []

    def connect(
        self, app: str = "web", user: str = "app", dbname: str = "appdb", port: int | None = None, **kwargs: object
    ) -> psycopg.Connection:
        password = APP_PASSWORD if user in ("app", "plain") else self.sandbox.pgbouncer.users.get(user, "")
        conn = psycopg.connect(
            host="127.0.0.1", port=port or self.sandbox.postgres.port, user=user, password=password,
            dbname=dbname, application_name=app, autocommit=True, connect_timeout=5, **kwargs,
        )  # fmt: skip
        self.open.append(conn)
        return conn

    def many(self, count: int, **kwargs: object) -> list[psycopg.Connection]:
        return [self.connect(**kwargs) for _ in range(count)]

    def close(self) -> None:
        for conn in self.open:
            try:
                conn.cancel_safe(timeout=2)
            except Exception:  # noqa: S110 - closing below is what matters
                pass
            conn.close()
        self.open.clear()


@contextmanager
def not_zero(clients: Clients, app: str) -> Iterator[None]:
    """What makes each gauge the check sends only while it is not zero (sparse.WHILE_NOT_ZERO) not zero, for
    ``app``: at PostgreSQL a connection idle, a transaction left idle holding a lock and a query waiting on it
    (active); at PgBouncer a client holding the one server connection of a session pool and a client waiting
    for it. Left to the test: the time that makes idle connections leaks."""
    box = clients.sandbox
    box.pgbouncer.databases["single"] = (
        f"host=127.0.0.1 port={box.postgres.port} dbname=appdb pool_size=1 pool_mode=session"
    )
    box.pgbouncer.reload()
    try:
        clients.connect(app=app).execute("SELECT 1")
        holder = clients.connect(app=app)
        holder.execute("BEGIN")
        holder.execute("SELECT pg_advisory_xact_lock(4242)")
        clients.connect(app=app).pgconn.send_query(b"SELECT pg_advisory_xact_lock(4242)")
        clients.connect(app=app, dbname="single", port=box.pgbouncer.port, prepare_threshold=None).execute("SELECT 1")
        waiting = clients.connect(app=app, dbname="single", port=box.pgbouncer.port, prepare_threshold=None)
        waiting.pgconn.send_query(b"SELECT 1")
        yield
    finally:
        clients.close()
        del box.pgbouncer.databases["single"]
        box.pgbouncer.reload()


@pytest.fixture
def clients(sandbox: Sandbox) -> Iterator[Clients]:
    pool = Clients(sandbox)
    yield pool
    pool.close()


@pytest.fixture
def webapps(sandbox: Sandbox) -> Iterator[Callable[..., Webapp]]:
    """Starts the Django web application under gunicorn as the `app` role on `appdb`, directly or through
    PgBouncer (``through="pgbouncer"``); every one started is stopped when the test ends."""
    started: list[Webapp] = []

    def start(through: str = "postgres", **settings: object) -> Webapp:
        port = sandbox.pgbouncer.port if through == "pgbouncer" else sandbox.postgres.port
        app = Webapp(Database("127.0.0.1", port, "appdb", "app", APP_PASSWORD), **settings)  # type: ignore[arg-type]
        started.append(app)
        return app.start()

    yield start
    for app in started:
        app.close()


def metric_values(aggregator, name: str, *tags: str) -> list[float]:
    """Values of a metric whose tags include all of ``tags``."""
    return [m.value for m in aggregator.metrics(name) if set(tags) <= set(m.tags)]


def one_value(aggregator, name: str, *tags: str) -> float:
    values = metric_values(aggregator, name, *tags)
    assert len(values) == 1, f"{name} {tags}: {values}"
    return values[0]


def timed_critical_run(aggregator, dd_run_check, check, service_check: str) -> tuple[float, str]:
    """Run the check once; assert the service check went CRITICAL; return the seconds taken and its message."""
    aggregator.reset()
    started = time.monotonic()
    dd_run_check(check)
    elapsed = time.monotonic() - started
    aggregator.assert_service_check(service_check, AgentCheck.CRITICAL)
    return elapsed, aggregator.service_checks(service_check)[0].message


def wait_for(sandbox: Sandbox, app: str, count: int, state: str | None = None, timeout: float = 20) -> None:
    """Wait until PostgreSQL shows ``count`` client backends of ``app`` (in ``state``)."""
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        with psycopg.connect(sandbox.postgres.dsn(), autocommit=True) as conn:
            seen = conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = %s AND (%s::text IS NULL OR state = %s)",
                [app, state, state],
            ).fetchone()[0]
        if seen == count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{app}: {seen} backends in {state or 'any state'}, expected {count}")


def run_new_check(aggregator, dd_run_check, instance: dict) -> None:
    """One run of a new check on ``instance``, its connections closed after; the aggregator holds that run only."""
    aggregator.reset()
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        dd_run_check(check)
    finally:
        check.cancel()


def health_of(aggregator) -> tuple[int, str]:
    """The connection_health status and message of the run the aggregator holds."""
    [status] = aggregator.service_checks("django_db.connection_health")
    print(f"\n[{status.status}] {status.message}")  # shown with -s: what an operator reads
    return status.status, status.message or ""


def health(aggregator, dd_run_check, instance: dict) -> tuple[int, str]:
    """One run of a new check on ``instance``: the connection_health status and message."""
    run_new_check(aggregator, dd_run_check, instance)
    return health_of(aggregator)


def run_health(aggregator, dd_run_check, check) -> tuple[int, str]:
    """One more run of a check kept across runs: the connection_health status and message."""
    aggregator.reset()
    dd_run_check(check)
    return health_of(aggregator)


def load_recorder() -> ModuleType:
    """tests/recorded/record.py, which records PgBouncer's answers and reads them back."""
    spec = importlib.util.spec_from_file_location("record", Path(__file__).parent / "recorded" / "record.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDB]:
    """One throwaway MariaDB for the MySQL tests, with an application user and database."""
    with MariaDB(max_connections=100) as server:
        server.create_app("app", APP_PASSWORD, "appdb")
        server.sql("CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(50)) ENGINE=InnoDB;", "appdb")
        server.sql("INSERT INTO items VALUES (1, 'one');", "appdb")
        yield server


def statements_of_two_runs(dd_run_check, check, section: str) -> list[str]:
    """What the check sends in its second and third runs, on the connection its first run opened and kept,
    whichever cursor it sends it on."""
    dd_run_check(check)
    source = getattr(check, section)
    conn = source.conn
    asked: list[str] = []
    execute = psycopg.Cursor.execute

    def counted(cursor, query, *args, **kwargs):
        if cursor.connection is conn:
            asked.append(str(query))
        return execute(cursor, query, *args, **kwargs)

    psycopg.Cursor.execute = counted
    try:
        dd_run_check(check)
        dd_run_check(check)
        assert source.conn is conn, "the check opened a new connection"
    finally:
        psycopg.Cursor.execute = execute
        check.cancel()
    return asked


@contextmanager
def looping(work: Callable[[], object], threads: int) -> Iterator[None]:
    """``threads`` threads that call ``work`` over and over until the block ends."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            work()

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        stop.set()
        for worker in workers:
            worker.join(15)
