"""PostgreSQL source: one persistent connection, one snapshot of plain data per run."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, LiteralString

import psycopg
from psycopg import sql

from .config import Endpoint
from .connection import close_quietly, connect, deadline

# Client backends, and rows the monitoring role may not see in full (their backend_type
# is NULL then): of those, only sessions tied to a database can be client backends.
CLIENT_BACKENDS = (
    "pid <> pg_backend_pid() AND (backend_type = 'client backend' OR (backend_type IS NULL AND datid IS NOT NULL))"
)

# db, user and app are always grouped on (and folded later); the client address only on request.
CLIENT_ADDR = "host(client_addr)"

# Grouped on datid and usesysid, not on names: reading only the function's own columns lets
# the planner drop the view's joins to pg_database and pg_authid, which would cost as much
# again as the scan itself. Names come from a cache (see PostgresSource.names).
# Per row only comparisons: the leak cutoff and the previous run's time are computed once
# (sub-selects), ages once per group (the oldest timestamp, subtracted from now()).
ACTIVITY_SQL = """
SELECT state, datid, usesysid, application_name, {extra} AS client_addr,
       count(*) AS n,
       count(*) FILTER (WHERE wait_event_type = 'Lock') AS waiting_on_lock,
       count(*) FILTER (WHERE state = 'idle'
                        AND state_change < (SELECT now() - make_interval(secs => %(leak)s))) AS leaked,
       extract(epoch FROM now() - min(CASE WHEN state = 'active' THEN query_start ELSE state_change END))::float8
         AS max_age,
       count(*) FILTER (WHERE backend_start > (SELECT to_timestamp(%(since)s))) AS opened,
       extract(epoch FROM now())::float8 AS now
FROM pg_stat_activity
WHERE {client_backends}
GROUP BY 1, 2, 3, 4, 5
"""

DATABASE_SQL = """
SELECT datname, sessions, sessions_abandoned, sessions_fatal, sessions_killed
FROM pg_stat_database WHERE datname IS NOT NULL
"""

SETTINGS_SQL = """
SELECT name, setting FROM pg_settings
WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections',
               'server_version_num', 'server_version', 'statement_timeout', 'idle_in_transaction_session_timeout')
"""

ROLE_SETTINGS_SQL = """
SELECT COALESCE(d.datname, ''), COALESCE(r.rolname, ''), s.setconfig
FROM pg_db_role_setting s
LEFT JOIN pg_database d ON d.oid = s.setdatabase
LEFT JOIN pg_roles r ON r.oid = s.setrole
"""

NAMES_SQL = """
SELECT 'db', oid, datname FROM pg_database
UNION ALL
SELECT 'user', oid, rolname FROM pg_roles
"""

LEAK_SUSPECTS_SQL = """
SELECT COALESCE(application_name, ''), COALESCE(host(client_addr), 'local'), datname, usename,
       extract(epoch FROM now() - state_change)::float8, query
FROM pg_stat_activity
WHERE {client_backends} AND state = 'idle' AND state_change < now() - make_interval(secs => %(leak)s)
ORDER BY state_change
LIMIT 50
"""


@dataclass(frozen=True)
class ServerSettings:
    version_num: int
    version: str
    max_connections: int
    superuser_reserved: int
    reserved: int  # reserved_connections, PostgreSQL 16 and later
    statement_timeout_ms: int
    idle_in_transaction_timeout_ms: int
    # (database or '', role or '', {setting: value}) from ALTER ROLE / ALTER DATABASE ... SET
    role_settings: tuple[tuple[str, str, dict[str, str]], ...] = ()

    @property
    def usable_slots(self) -> int:
        return max(0, self.max_connections - self.superuser_reserved - self.reserved)

    @property
    def reserved_slots(self) -> int:
        return self.superuser_reserved + self.reserved


@dataclass(frozen=True)
class ActivityGroup:
    state: str | None  # as pg_stat_activity names it; None when the role may not see it
    db: str
    user: str
    app: str
    client_addr: str
    count: int
    waiting_on_lock: int = 0
    leaked: int = 0
    max_age: float = 0.0  # seconds in the state; for active, since query_start
    opened: int = 0  # backends started after the previous snapshot


@dataclass(frozen=True)
class DatabaseSessions:
    db: str
    opened: int
    abandoned: int
    fatal: int
    killed: int


@dataclass(frozen=True)
class LeakSuspect:
    app: str
    client_addr: str
    db: str
    user: str
    idle_seconds: float
    query: str = field(repr=False)


@dataclass(frozen=True)
class PgSnapshot:
    settings: ServerSettings
    groups: tuple[ActivityGroup, ...]
    databases: tuple[DatabaseSessions, ...] | None  # None before PostgreSQL 14
    server_time: float  # epoch seconds on the server when the snapshot was taken
    new_connection: bool
    leak_suspects: tuple[LeakSuspect, ...] = ()


class PostgresSource:
    def __init__(
        self,
        endpoint: Endpoint,
        group_by: tuple[str, ...],
        leak_idle_seconds: float,
        log: logging.Logger | logging.LoggerAdapter,
    ):
        self.endpoint = endpoint
        self.leak_idle_seconds = leak_idle_seconds
        self.log = log
        extra = CLIENT_ADDR if "client_addr" in group_by else "''"
        self.activity_sql = ACTIVITY_SQL.format(extra=extra, client_backends=CLIENT_BACKENDS)
        self.suspects_sql = LEAK_SUSPECTS_SQL.format(client_backends=CLIENT_BACKENDS)
        self.conn: psycopg.Connection | None = None
        self.settings: ServerSettings | None = None
        self.names: dict[tuple[str, int], str] = {}  # ("db" or "user", oid): name
        self.pipeline = psycopg.Pipeline.is_supported()

    def close(self) -> None:
        close_quietly(self.conn)
        self.conn = None

    def snapshot(self, since: float | None, want_suspects: bool = False) -> PgSnapshot:
        """Read the server; any failure closes the connection, to be opened again next run."""
        try:
            return self._snapshot(since, want_suspects)
        except BaseException:
            self.close()
            raise

    def _snapshot(self, since: float | None, want_suspects: bool) -> PgSnapshot:
        new = self.conn is None or self.conn.closed
        if new:
            self.conn = connect(self.endpoint)
            self.settings = self._read_settings(self.conn)
        assert self.conn is not None and self.settings is not None
        conn = self.conn
        timeout = self.endpoint.query_timeout + 1  # the server's statement_timeout normally answers first
        # An infinite "since" counts no backend as opened on the first run.
        params = {"leak": self.leak_idle_seconds, "since": float("inf") if since is None else since}
        with_sessions = self.settings.version_num >= 140000
        with deadline(conn, timeout):
            # Both statements in one round trip where libpq can pipeline (libpq 14 and later).
            with conn.pipeline() if self.pipeline else nullcontext():
                activity = conn.execute(self.activity_sql, params)
                sessions = conn.execute(DATABASE_SQL) if with_sessions else None
            rows = activity.fetchall()
            databases = tuple(DatabaseSessions(*row) for row in sessions.fetchall()) if sessions else None
            if new or any(key not in self.names for r in rows for key in (("db", r[1]), ("user", r[2])) if key[1]):
                self.names = {(kind, oid): name for kind, oid, name in conn.execute(NAMES_SQL).fetchall()}
            suspects: tuple[LeakSuspect, ...] = ()
            if want_suspects and any(row[7] for row in rows):
                suspects = tuple(LeakSuspect(*row) for row in conn.execute(self.suspects_sql, params).fetchall())
            server_time = rows[0][10] if rows else _scalar(conn, "SELECT extract(epoch FROM now())::float8")
        groups = tuple(
            ActivityGroup(
                state=row[0],
                db=self.names.get(("db", row[1]), ""),
                user=self.names.get(("user", row[2]), ""),
                app=row[3] or "",
                client_addr=row[4] or "",
                count=row[5],
                waiting_on_lock=row[6],
                leaked=row[7],
                max_age=max(0.0, row[8] or 0.0),
                opened=row[9],
            )
            for row in rows
        )
        return PgSnapshot(self.settings, groups, databases, server_time, new, suspects)

    def _read_settings(self, conn: psycopg.Connection) -> ServerSettings:
        timeout = self.endpoint.query_timeout
        with deadline(conn, timeout):
            values: dict[str, str] = dict(conn.execute(SETTINGS_SQL).fetchall())
            role_settings = tuple(
                (db, role, _parse_setconfig(config)) for db, role, config in conn.execute(ROLE_SETTINGS_SQL).fetchall()
            )
            # After reading the server's own values: bound this session's statements.
            conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(int(timeout * 1000))))
        settings = ServerSettings(
            version_num=int(values["server_version_num"]),
            version=values["server_version"],
            max_connections=int(values["max_connections"]),
            superuser_reserved=int(values["superuser_reserved_connections"]),
            reserved=int(values.get("reserved_connections", 0)),
            statement_timeout_ms=int(values["statement_timeout"]),
            idle_in_transaction_timeout_ms=int(values["idle_in_transaction_session_timeout"]),
            role_settings=role_settings,
        )
        self.log.debug(
            "PostgreSQL %s: max_connections=%d, reserved=%d",
            settings.version, settings.max_connections, settings.reserved_slots,
        )  # fmt: skip
        return settings


def _scalar(conn: psycopg.Connection, query: LiteralString) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _parse_setconfig(config: list[str] | None) -> dict[str, str]:
    result = {}
    for item in config or []:
        name, _, value = item.partition("=")
        result[name] = value
    return result
