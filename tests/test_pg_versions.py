"""The PostgreSQL side on each major version users run: 12, 14, 15 (the machine's own), 16 and 18.

Each version is a real server from django_db_tools.pg_versions (fetched once into the user's cache),
with PgBouncer 1.18 in front and a small max_connections so that refusals are cheap. Clients are
plain psycopg connections: Django refuses servers older than it supports.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools import pg_versions
from django_db_tools.sandbox import SUPERUSER, SUPERUSER_PASSWORD, Sandbox, reachable_by_others

from .conftest import APP_PASSWORD, VERSIONS_RAN, Clients, metric_values, one_value

MAJORS = (12, 14, 15, 16, 18)
MAX_CONNECTIONS = 12
SUPERUSER_RESERVED = 3  # what the sandbox sets on every version
RESERVED = 2  # reserved_connections, from PostgreSQL 16, for roles granted pg_use_reserved_connections
HEALTH = "django_db.connection_health"
ALIGNMENT = "django_db.config_alignment"

# The refusal each version sends an ordinary role once only reserved slots are left.
RESERVED_FOR_SUPERUSERS_UP_TO_15 = "remaining connection slots are reserved for non-replication superuser connections"
RESERVED_FOR_ROLE_FROM_16 = (
    'remaining connection slots are reserved for roles with privileges of the "pg_use_reserved_connections" role'
)
RESERVED_FOR_SUPERUSERS_FROM_16 = "remaining connection slots are reserved for roles with the SUPERUSER attribute"
TOO_MANY = "sorry, too many clients already"


# -- fetching and caching builds -------------------------------------------------------------------


def _package(path: Path, major: int) -> str:
    """A tarball laid out as the npm package is, whose postgres only prints its version; its integrity."""
    files = {
        "package/native/bin/postgres": (f"#!/bin/sh\necho 'postgres (PostgreSQL) {major}.99'\n", 0o755),
        "package/native/lib/libpq.so.5.99": ("", 0o644),
        "package/native/pg-symlinks.json": (
            json.dumps([{"source": "native/lib/libpq.so.5.99", "target": "native/lib/libpq.so.5"}]),
            0o644,
        ),
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, (text, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(text.encode()), mode
            archive.addfile(info, io.BytesIO(text.encode()))
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def test_two_fetches_at_once_leave_one_build_and_no_leftovers(tmp_path, monkeypatch):
    tarball = tmp_path / "package.tgz"
    integrity = _package(tarball, 12)
    cache = tmp_path / "cache"
    both_downloading = threading.Barrier(2, timeout=30)

    def download(version: str, pinned: str, work: Path) -> Path:
        both_downloading.wait()  # neither has renamed its build into place yet
        copy = work / tarball.name
        copy.write_bytes(tarball.read_bytes())
        pg_versions.verify(copy, pinned)
        return copy

    monkeypatch.setattr(pg_versions, "_download", download)
    found: list[object] = []
    threads = [
        threading.Thread(target=lambda: found.append(pg_versions.fetch("12.99.0-test", integrity, cache)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(found) == 2 and found[0] == found[1], found
    assert sorted(os.listdir(cache)) == ["12.99.0-test"]  # no unpacking folder left behind
    build = found[0]
    assert build.bindir == cache / "12.99.0-test" / "bin"
    assert build.env == {"LD_LIBRARY_PATH": str(cache / "12.99.0-test" / "lib")}
    assert os.readlink(cache / "12.99.0-test" / "lib" / "libpq.so.5") == "libpq.so.5.99"
    # Cached: no second download.
    monkeypatch.setattr(pg_versions, "_download", lambda *args: pytest.fail("downloaded again"))
    assert pg_versions.fetch("12.99.0-test", integrity, cache) == build


def test_a_tarball_of_another_digest_is_refused(tmp_path):
    tarball = tmp_path / "package.tgz"
    _package(tarball, 12)
    other = _package(tmp_path / "other.tgz", 14)
    with pytest.raises(pg_versions.FetchError, match="is not the pinned"):
        pg_versions.verify(tarball, other)


def test_a_build_that_does_not_run_is_refused_and_not_cached(tmp_path, monkeypatch):
    tarball = tmp_path / "package.tgz"
    integrity = _package(tarball, 14)  # says 14 where 12 is asked for
    monkeypatch.setattr(pg_versions, "_download", lambda version, pinned, work: tarball)
    with pytest.raises(pg_versions.FetchError, match=r"does not run here: postgres \(PostgreSQL\) 14\.99"):
        pg_versions.fetch("12.99.0-test", integrity, tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []


def test_without_npm_the_failure_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    version, integrity = pg_versions.PINNED[12]
    with pytest.raises(pg_versions.FetchError, match=r"npm is needed to fetch PostgreSQL 12\.22\.0-beta\.15"):
        pg_versions.fetch(version, integrity, tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []


def test_the_cached_build_is_used_without_npm(monkeypatch):
    first = pg_versions.binaries(12)  # fetched by now, or fetched here
    monkeypatch.setenv("PATH", "/nonexistent")
    again = pg_versions.binaries(12)
    assert again == first
    assert again.bindir == pg_versions.cache_root() / pg_versions.PINNED[12][0] / "bin"
    result = subprocess.run(
        [str(again.bindir / "postgres"), "--version"], env={**os.environ, **again.env}, capture_output=True, text=True
    )
    assert result.stdout.startswith("postgres (PostgreSQL) 12.22"), result


# -- the matrix ------------------------------------------------------------------------------------


@dataclass
class Server:
    major: int
    box: Sandbox

    @property
    def reserved(self) -> int:
        return SUPERUSER_RESERVED + (RESERVED if self.major >= 16 else 0)

    @property
    def usable(self) -> int:
        return MAX_CONNECTIONS - self.reserved

    def instance(self, **options: object) -> dict:
        return {"postgres": self.box.postgres.instance(Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD), **options}

    def superuser(self, **kwargs: object) -> psycopg.Connection:
        return psycopg.connect(self.box.postgres.dsn(), autocommit=True, connect_timeout=5, **kwargs)


@pytest.fixture(scope="module", params=MAJORS, ids=[f"pg{major}" for major in MAJORS])
def server(request) -> Iterator[Server]:
    major = request.param
    binaries = pg_versions.binaries(major)  # a failed download fails every test of this version, with its reason
    settings = {"reserved_connections": str(RESERVED)} if major >= 16 else {}
    box = Sandbox(
        max_connections=MAX_CONNECTIONS, pg_settings=settings, postgres_binaries=binaries, default_pool_size=2
    )
    with box:
        box.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        box.psql("CREATE DATABASE appdb OWNER app")
        if major >= 16:
            box.psql(f"CREATE ROLE trusted LOGIN PASSWORD '{APP_PASSWORD}'")
            box.psql("GRANT pg_use_reserved_connections TO trusted")
        box.pgbouncer.users["app"] = APP_PASSWORD
        box.pgbouncer.reload()
        VERSIONS_RAN[f"postgresql-{major}"] = box.psql("SELECT version()").strip()
        yield Server(major, box)


@pytest.fixture
def clients(server: Server) -> Iterator[Clients]:
    pool = Clients(server.box)
    yield pool
    pool.close()


def _in_background(conn: psycopg.Connection, sql: str) -> None:
    def run() -> None:
        try:
            conn.execute(sql)
        except psycopg.Error:
            pass  # cancelled when the test ends

    threading.Thread(target=run, daemon=True).start()


CLIENT_BACKENDS = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"


def _client_backends(server: Server) -> int:
    """Client backends as PostgreSQL counts them, this query's own included."""
    with server.superuser() as conn:
        return conn.execute(CLIENT_BACKENDS).fetchone()[0]


def _wait_until_alone(server: Server) -> None:
    """Until the backends of connections closed by earlier tests have exited, so that counts hold still."""
    with server.superuser() as conn:
        deadline = time.monotonic() + 10
        while (others := conn.execute(CLIENT_BACKENDS).fetchone()[0] - 1) > 0:
            assert time.monotonic() < deadline, f"{others} client backends never exited"
            time.sleep(0.05)


def _health(aggregator) -> tuple[int, str]:
    checks = aggregator.service_checks(HEALTH)
    assert len(checks) == 1, checks
    return checks[0].status, checks[0].message


def test_runs_the_version_asked_for(aggregator, dd_run_check, server):
    check = DjangoDbCheck("django_db", {}, [server.instance()])
    dd_run_check(check)
    version = check.postgres.settings.version
    print(f"\n[pg{server.major}] PostgreSQL {version}")
    assert check.postgres.settings.version_num // 10000 == server.major
    assert version.startswith(f"{server.major}.")
    check.cancel()
    # A build root's postgres user cannot reach (cached under /root) runs from links in the sandbox folder.
    build, used = pg_versions.binaries(server.major), server.box.postgres.bindir
    if server.box.postgres.user is not None and not reachable_by_others(build.bindir):
        assert used.is_relative_to(server.box.root), used
        assert (build.bindir / "postgres").stat().st_uid == os.geteuid()  # the cache keeps its owner
    else:
        assert used == build.bindir


def test_connections_by_state(aggregator, dd_run_check, server, clients):
    clients.many(2, app="direct")
    _in_background(clients.connect(app="direct"), "SELECT pg_sleep(60)")
    in_tx = clients.connect(app="direct")
    in_tx.execute("BEGIN")
    in_tx.execute("SELECT 1")
    aborted = clients.connect(app="direct")
    aborted.execute("BEGIN")
    with pytest.raises(psycopg.errors.DivisionByZero):
        aborted.execute("SELECT 1/0")
    with server.superuser() as watcher:
        deadline = time.monotonic() + 10
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'direct' AND state = 'active'"
        while watcher.execute(query).fetchone()[0] != 1:
            assert time.monotonic() < deadline, "the sleeping client never showed as active"
            time.sleep(0.05)
    check = DjangoDbCheck("django_db", {}, [server.instance()])
    dd_run_check(check)
    direct = ("db:appdb", "user:app", "app:direct")
    figures = {
        state: one_value(aggregator, "django_db.postgres.connections", f"state:{state}", *direct)
        for state in ("idle", "active", "idle_in_transaction", "idle_in_transaction_aborted")
    }
    print(f"\n[pg{server.major}] app=direct by state: {figures}")
    assert figures == {"idle": 2, "active": 1, "idle_in_transaction": 1, "idle_in_transaction_aborted": 1}
    assert one_value(aggregator, "django_db.postgres.active.max_duration", "db:appdb", "app:direct") > 0
    assert one_value(aggregator, "django_db.postgres.idle_in_transaction.max_age", "db:appdb", "app:direct") > 0
    assert metric_values(aggregator, "django_db.postgres.connections", "app:datadog-django-db") == []
    aggregator.assert_service_check("django_db.postgres.can_connect", AgentCheck.OK)
    check.cancel()


def test_utilisation_and_reserved_slots(aggregator, dd_run_check, server, clients):
    _wait_until_alone(server)
    clients.many(3, app="direct")
    check = DjangoDbCheck("django_db", {}, [server.instance(thresholds={"utilization": {"warning": 0.01}})])
    dd_run_check(check)
    backends = _client_backends(server) - 1  # less the counting query's own connection, closed again
    assert one_value(aggregator, "django_db.postgres.max_connections") == MAX_CONNECTIONS
    assert one_value(aggregator, "django_db.postgres.reserved_connections") == server.reserved
    assert check.postgres.settings.reserved == (RESERVED if server.major >= 16 else 0)
    utilisation = one_value(aggregator, "django_db.postgres.connection_utilization")
    assert utilisation == pytest.approx(backends / server.usable)
    assert one_value(aggregator, "django_db.postgres.connections_available") == server.usable - backends
    status, message = _health(aggregator)
    print(f"\n[pg{server.major}] reserved {server.reserved}, utilisation {utilisation:.3f}: {message}")
    assert status == AgentCheck.WARNING
    assert f"WARNING: {backends} of {server.usable} usable slots in use ({backends / server.usable:.0%}" in message
    check.cancel()


def _wait_for_sessions(conn: psycopg.Connection, expected: int) -> None:
    """Until pg_stat_database counts ``expected`` sessions in the connection's database.

    PostgreSQL 14 counts a session when the backend first reports its statistics, through the
    statistics collector, so the figure lags a moment; from 15 it is in shared memory at once.
    """
    query = "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
    deadline = time.monotonic() + 10
    while (seen := conn.execute(query).fetchone()[0]) != expected:
        assert time.monotonic() < deadline, f"pg_stat_database.sessions stayed at {seen}, not {expected}"
        conn.execute("SELECT pg_stat_clear_snapshot()")
        time.sleep(0.05)


def test_sessions_and_churn(aggregator, dd_run_check, server, clients):
    dbname = "churn"  # a database of its own: its session counters start at zero
    server.box.psql(f"CREATE DATABASE {dbname} OWNER app")
    _wait_until_alone(server)
    check = DjangoDbCheck("django_db", {}, [server.instance(thresholds={"churn_per_minute": {"warning": 1}})])
    check.sessions.window.window = 0.5  # runs a moment apart here; a minute at the least in the check
    dd_run_check(check)
    first = metric_values(aggregator, "django_db.postgres.sessions.opened", f"db:{dbname}")
    # From 14 pg_stat_database counts sessions; below, the check counts backends started since its previous run.
    assert first == ([0] if server.major >= 14 else [])
    before = check.sessions.window.samples[-1]
    aggregator.reset()
    opened = clients.many(3, app="direct", dbname=dbname)
    if server.major >= 14:
        for conn in opened:
            conn.execute("SELECT 1")
        _wait_for_sessions(opened[0], 3)
        clients.close()  # opened and closed again: churn
    time.sleep(0.6)
    dd_run_check(check)
    assert one_value(aggregator, "django_db.postgres.sessions.opened", f"db:{dbname}") == 3
    after = check.sessions.window.samples[-1]
    new_sessions = after.opened - before.opened  # on every database
    if server.major == 14:
        assert new_sessions >= 3  # may include earlier sessions the statistics collector reported late
    else:
        assert new_sessions == 3
    stayed = max(0, after.connections - before.connections)
    churn = (new_sessions - stayed) * 60.0 / (after.time - before.time)
    status, message = _health(aggregator)
    print(f"\n[pg{server.major}] sessions.opened db:{dbname} {first} -> 3, {new_sessions} new in all; {message}")
    if server.major >= 14:
        assert status == AgentCheck.WARNING
        assert f"WARNING: {churn:.0f} connections a minute opened and closed again (churn, over " in message
    else:  # below 14 only backends still there are seen: the 3 stay, so they are no churn
        assert stayed == 3 and "(churn" not in message
    # Unchanged since the first run sent them (14 on), or not counted at all (below 14): not sent.
    for end in ("killed", "fatal", "abandoned"):
        assert metric_values(aggregator, f"django_db.postgres.sessions.{end}", f"db:{dbname}") == []
    check.cancel()


def _set_pool_size(box: Sandbox, size: int) -> None:
    """Reload PgBouncer with another default_pool_size; return once its console shows it."""
    box.pgbouncer.settings["default_pool_size"] = size
    box.pgbouncer.reload()
    with psycopg.connect(
        host="127.0.0.1", port=box.pgbouncer.port, user=SUPERUSER, password=SUPERUSER_PASSWORD, dbname="pgbouncer",
        autocommit=True, cursor_factory=psycopg.ClientCursor, connect_timeout=5, sslmode="disable",
    ) as admin:  # fmt: skip
        deadline = time.monotonic() + 10
        while dict(row[:2] for row in admin.execute("SHOW CONFIG").fetchall())["default_pool_size"] != str(size):
            assert time.monotonic() < deadline, f"PgBouncer never took default_pool_size={size}"
            time.sleep(0.05)


def test_alignment_reads_role_settings(aggregator, dd_run_check, server):
    box = server.box
    client = psycopg.connect(
        host="127.0.0.1", port=box.pgbouncer.port, user="app", password=APP_PASSWORD, dbname="appdb",
        autocommit=True, connect_timeout=5, sslmode="disable",
    )  # fmt: skip
    instance = {**box.instance(), "conn_max_age": 60, "applications": {"include": ["^nothing$"]}}

    def alignment() -> tuple[int, str]:
        aggregator.reset()
        check = DjangoDbCheck("django_db", {}, [instance])  # a new check reads the settings again
        dd_run_check(check)
        check.cancel()
        found = aggregator.service_checks(ALIGNMENT)
        assert len(found) == 1, found
        return found[0].status, found[0].message

    try:
        client.execute("SELECT 1")  # a pool for app@appdb at PgBouncer
        unset = alignment()
        assert unset[0] == AgentCheck.WARNING
        assert "statement_timeout and idle_in_transaction_session_timeout are both unset for app@appdb:" in unset[1]
        box.psql("ALTER ROLE app SET statement_timeout = '30s'")
        assert alignment() == (AgentCheck.OK, "")
        box.psql("ALTER ROLE app IN DATABASE appdb SET statement_timeout = 0")  # the closer setting wins
        assert alignment()[1] == unset[1]
        box.psql("ALTER ROLE app IN DATABASE appdb RESET statement_timeout")
        _set_pool_size(box, 20)
        too_big = alignment()
        print(f"\n[pg{server.major}] {too_big[1]}")
        assert too_big == (
            AgentCheck.WARNING,
            f"PgBouncer may open 20 server connections (pool sizes plus reserve pools) but PostgreSQL has "
            f"{server.usable} usable slots: lower the pool sizes or set max_db_connections",
        )
    finally:
        client.close()
        box.psql("ALTER ROLE app RESET statement_timeout")
        _set_pool_size(box, 2)


def _fill(server: Server, user: str, password: str, held: list[psycopg.Connection]) -> str:
    """Connect as ``user`` until PostgreSQL refuses; the refusal's text."""
    dsn = server.box.postgres.dsn(user, password)
    for _ in range(MAX_CONNECTIONS + 1):
        try:
            held.append(psycopg.connect(dsn, autocommit=True, connect_timeout=5, application_name=f"fill-{user}"))
        except psycopg.OperationalError as e:
            return str(e)
    raise AssertionError(f"{user} was never refused")


# Last in this module: it fills the server, and the backends it leaves take a moment to exit.
def test_refusals_by_version(aggregator, dd_run_check, server):
    instance = server.instance(log_files=[str(server.box.postgres.logfile)])
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)  # holds one slot from now on
    held: list[psycopg.Connection] = []
    try:
        refusals = [_fill(server, "app", APP_PASSWORD, held)]
        if server.major >= 16:
            assert RESERVED_FOR_ROLE_FROM_16 in refusals[0], refusals[0]
            refusals.append(_fill(server, "trusted", APP_PASSWORD, held))
            assert RESERVED_FOR_SUPERUSERS_FROM_16 in refusals[1], refusals[1]
        else:
            assert RESERVED_FOR_SUPERUSERS_UP_TO_15 in refusals[0], refusals[0]
        refusals.append(_fill(server, SUPERUSER, SUPERUSER_PASSWORD, held))
        assert TOO_MANY in refusals[-1], refusals[-1]
        print(f"\n[pg{server.major}] refusals: " + " | ".join(r.split("FATAL:")[-1].strip() for r in refusals))

        aggregator.reset()
        dd_run_check(check)
        status, message = _health(aggregator)
        print(f"[pg{server.major}] {message}")
        assert status == AgentCheck.CRITICAL
        over = MAX_CONNECTIONS - server.usable
        assert message.startswith(
            f"CRITICAL: {MAX_CONNECTIONS} connections for {server.usable} usable slots: "
            f"{over} of the reserved slots taken ({MAX_CONNECTIONS / server.usable:.0%}"
        ), message
        reserved_refusals = len(refusals) - 1
        assert f"CRITICAL: reserved_slots seen ({reserved_refusals} from log)" in message
        assert "CRITICAL: too_many_clients seen (1 from log)" in message
        signatures = {
            name: sum(metric_values(aggregator, "django_db.errors", f"signature:{name}", "source:log"))
            for name in ("reserved_slots", "too_many_clients")
        }
        assert signatures == {"reserved_slots": reserved_refusals, "too_many_clients": 1}

        fresh = DjangoDbCheck("django_db", {}, [instance])  # the monitoring role is refused too
        aggregator.reset()
        dd_run_check(fresh)
        fresh.cancel()
        aggregator.assert_service_check("django_db.postgres.can_connect", AgentCheck.CRITICAL)
        refused = aggregator.service_checks("django_db.postgres.can_connect")[0].message
        assert "too_many_clients" in refused and "max_connections" in refused, refused
        assert sum(metric_values(aggregator, "django_db.errors", "signature:too_many_clients", "source:postgres")) == 1
    finally:
        for conn in held:
            conn.close()
        check.cancel()
