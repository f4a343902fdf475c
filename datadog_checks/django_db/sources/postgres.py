"""PostgreSQL source: one persistent connection, one snapshot of plain data per run."""

from __future__ import annotations

import logging
from typing import Any, LiteralString, NamedTuple

import psycopg
from psycopg import sql

from ..config import Endpoint
from ..connection import Reconnecting, deadline
from ..patterns import NamePattern
from ..records import ActivityGroup, DatabaseSessions, LeakSuspect, PgSnapshot, ServerSettings

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
# `leaked` counts idle backends past each leak threshold in use (one per CONN_MAX_AGE of the
# application profiles), the group's own picked afterwards by its application name.
# Per row only comparisons: the leak cutoffs and the previous run's time are computed once
# (sub-selects), ages once per group (the oldest timestamp, subtracted from now()).
ACTIVITY_SQL = """
SELECT state, datid, usesysid, application_name, {extra} AS client_addr,
       count(*) AS n,
       count(*) FILTER (WHERE wait_event_type = 'Lock') AS waiting_on_lock,
       ARRAY[{leaked}]::int[] AS leaked,
       extract(epoch FROM now() - min(CASE WHEN state = 'active' THEN query_start ELSE state_change END))::float8
         AS max_age,
       count(*) FILTER (WHERE backend_start > (SELECT to_timestamp(%(since)s))) AS opened,
       extract(epoch FROM now())::float8 AS now{sessions}
FROM pg_stat_activity
WHERE {client_backends}
GROUP BY 1, 2, 3, 4, 5
"""

# From PostgreSQL 14, the sessions of each database come in the same statement, one row per database
# below the groups (their `n` NULL): one round trip, one prepared statement, no pipeline to drive.
# Template databases (template0, template1) are left out: nobody's application works in them.
SESSIONS_COLUMNS = ", NULL::int8 AS sessions, NULL::int8, NULL::int8, NULL::int8"
DATABASE_SQL = """
UNION ALL
SELECT NULL, datid, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, extract(epoch FROM now())::float8,
       sessions, sessions_abandoned, sessions_fatal, sessions_killed
FROM pg_stat_database WHERE datid IN (SELECT oid FROM pg_database WHERE NOT datistemplate)
"""

SETTINGS_SQL = """
SELECT name, setting, source, boot_val FROM pg_settings
WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections',
               'server_version_num', 'server_version', 'statement_timeout', 'idle_in_transaction_session_timeout')
"""

# Settings judged for the application's roles, whose server-wide value the session's may hide.
TIMEOUTS = ("statement_timeout", "idle_in_transaction_session_timeout")
# pg_settings.source values that say the session has the server's own value; any other ('user',
# 'database', 'database user', 'client') is this session's and masks it.
SERVER_SOURCES = frozenset({"default", "configuration file", "command line", "environment variable", "override"})

# The configuration files' values (postgresql.conf, postgresql.auto.conf): superusers only, unless granted.
FILE_SETTINGS_READABLE_SQL = "SELECT has_table_privilege('pg_catalog.pg_file_settings', 'SELECT')"
FILE_SETTINGS_SQL = """
SELECT name, setting FROM pg_file_settings WHERE applied AND name = ANY(%(names)s) ORDER BY seqno
"""

ROLE_SETTINGS_SQL = """
SELECT COALESCE(d.datname, ''), COALESCE(r.rolname, ''), s.setconfig
FROM pg_db_role_setting s
LEFT JOIN pg_database d ON d.oid = s.setdatabase
LEFT JOIN pg_roles r ON r.oid = s.setrole
"""

NAMES_SQL = """
SELECT 'db', oid, datname, datistemplate FROM pg_database
UNION ALL
SELECT 'user', oid, rolname, false FROM pg_roles
"""

# Whose backends the monitoring role sees in full: every role's with pg_read_all_stats (pg_monitor) or
# as a superuser, else those of the roles it has the privileges of. Read once per connection.
VISIBILITY_SQL = """
SELECT pg_has_role('pg_read_all_stats', 'USAGE'),
       ARRAY(SELECT oid FROM pg_roles WHERE pg_has_role(oid, 'USAGE'))::oid[]
"""

# A backend the role sees in full but whose state is still NULL has not finished starting
# (before its first ReadyForQuery): PostgreSQL 18 names that state itself.
STARTING = "starting"

LEAKED_SQL = (
    "count(*) FILTER (WHERE state = 'idle' AND state_change < (SELECT now() - make_interval(secs => %(leak{i})s)))"
)

LEAK_SUSPECTS_SQL = """
SELECT COALESCE(application_name, ''), COALESCE(host(client_addr), 'local'), datname, usename,
       extract(epoch FROM now() - state_change)::float8, query
FROM pg_stat_activity
WHERE {client_backends} AND state = 'idle' AND state_change < now() - make_interval(secs => %(leak)s)
ORDER BY state_change
LIMIT 50
"""


class ActivityRow(NamedTuple):
    """A row of ACTIVITY_SQL, its columns in the statement's order."""

    state: str | None
    datid: int | None
    usesysid: int | None
    application_name: str | None
    client_addr: str | None
    n: int
    waiting_on_lock: int
    leaked: list[int]  # one count per leak threshold
    max_age: float | None
    opened: int
    now: float
    # A database's row (PostgreSQL 14 and later): every column above NULL but datid and now.
    sessions: int | None = None
    sessions_abandoned: int | None = None
    sessions_fatal: int | None = None
    sessions_killed: int | None = None


class PostgresSource(Reconnecting):
    def __init__(
        self,
        endpoint: Endpoint,
        group_by: tuple[str, ...],
        leak_idle_seconds: float,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
        leak_rules: tuple[tuple[NamePattern, float], ...] = (),
    ):
        """``leak_rules``: (application_name pattern, its leak threshold), the first match wins; others
        use ``leak_idle_seconds``."""
        self.endpoint = endpoint
        self.leak_idle_seconds = leak_idle_seconds
        self.leak_rules = leak_rules
        self.thresholds = sorted({leak_idle_seconds, *(seconds for _, seconds in leak_rules)})
        self.log = log
        extra = CLIENT_ADDR if "client_addr" in group_by else "''"
        leaked = ", ".join(LEAKED_SQL.format(i=i) for i in range(len(self.thresholds)))
        activity = {"extra": extra, "client_backends": CLIENT_BACKENDS, "leaked": leaked}
        self.activity_sql = ACTIVITY_SQL.format(**activity, sessions="")
        self.activity_sessions_sql = ACTIVITY_SQL.format(**activity, sessions=SESSIONS_COLUMNS) + DATABASE_SQL
        self.suspects_sql = LEAK_SUSPECTS_SQL.format(client_backends=CLIENT_BACKENDS)
        self.settings: ServerSettings | None = None
        self.names: dict[tuple[str, int | None], str] = {}  # ("db" or "user", oid): name
        self.sees_all = True  # the role sees every backend in full (pg_read_all_stats or superuser)
        self.visible_roles: frozenset[int] = frozenset()  # else, the roles whose backends it sees in full
        self.templates: frozenset[int] = frozenset()  # oids of the template databases

    def snapshot(self, since: float | None, want_suspects: bool = False) -> PgSnapshot:
        """Read the server; a connection found broken is opened again at once, any other failure next run."""
        return self.read(lambda: self._snapshot(since, want_suspects))

    def _snapshot(self, since: float | None, want_suspects: bool) -> PgSnapshot:
        new = self.conn is None or self.conn.closed
        if new:
            self.settings = self._read_settings(self.open())
            self._read_visibility(self.conn)
        assert self.conn is not None and self.settings is not None
        conn = self.conn
        timeout = self.endpoint.query_timeout + 1  # the server's statement_timeout normally answers first
        # An infinite "since" counts no backend as opened on the first run.
        params: dict[str, float] = {"leak": self.thresholds[0], "since": float("inf") if since is None else since}
        params.update({f"leak{i}": seconds for i, seconds in enumerate(self.thresholds)})
        with_sessions = self.settings.version_num >= 140000
        with deadline(conn, timeout):
            read = conn.execute(self.activity_sessions_sql if with_sessions else self.activity_sql, params).fetchall()
            every = [ActivityRow(*row) for row in read]
            rows = [r for r in every if r.n is not None]
            per_db = [r for r in every if r.n is None]
            oids = {("db", r.datid) for r in every if r.datid} | {("user", r.usesysid) for r in rows if r.usesysid}
            if new or not oids <= self.names.keys():
                names = conn.execute(NAMES_SQL).fetchall()
                self.names = {(kind, oid): name for kind, oid, name, _ in names}
                self.templates = frozenset(oid for kind, oid, _, template in names if template)
            suspects: tuple[LeakSuspect, ...] = ()
            leaked = [r.leaked[self.thresholds.index(self.leak_seconds(r.application_name or ""))] for r in rows]
            if want_suspects and any(leaked):
                found = (LeakSuspect(*row) for row in conn.execute(self.suspects_sql, params).fetchall())
                suspects = tuple(s for s in found if s.idle_seconds > self.leak_seconds(s.app))
            server_time = every[0].now if every else _scalar(conn, "SELECT extract(epoch FROM now())::float8")
        databases = (
            tuple(
                DatabaseSessions(self.names.get(("db", r.datid), ""), r.sessions or 0, r.sessions_abandoned or 0,
                                 r.sessions_fatal or 0, r.sessions_killed or 0)
                for r in per_db
            )
            if with_sessions
            else None
        )  # fmt: skip
        groups = tuple(
            ActivityGroup(
                state=self.state_of(r),
                db=self.names.get(("db", r.datid), ""),
                user=self.names.get(("user", r.usesysid), ""),
                app=r.application_name or "",
                client_addr=r.client_addr or "",
                count=r.n,
                waiting_on_lock=r.waiting_on_lock,
                leaked=leaked[i],
                max_age=max(0.0, r.max_age or 0.0),
                opened=r.opened,
            )
            for i, r in enumerate(rows)
            if r.datid not in self.templates
        )
        on_templates = sum(r.n for r in rows if r.datid in self.templates)
        return PgSnapshot(self.settings, groups, databases, server_time, new, suspects, on_templates)

    def state_of(self, row: ActivityRow) -> str | None:
        """The row's state; a NULL one is ``starting`` where the role sees the backend in full, else hidden."""
        if row.state is None and (self.sees_all or row.usesysid in self.visible_roles):
            return STARTING
        return row.state

    def _read_visibility(self, conn: psycopg.Connection | None) -> None:
        assert conn is not None
        with deadline(conn, self.endpoint.query_timeout):
            row = conn.execute(VISIBILITY_SQL).fetchone()
        assert row is not None
        self.sees_all, self.visible_roles = bool(row[0]), frozenset(int(oid) for oid in row[1] or ())

    def leak_seconds(self, application_name: str) -> float:
        for pattern, seconds in self.leak_rules:
            if pattern.search(application_name):
                return seconds
        return self.leak_idle_seconds

    def _read_settings(self, conn: psycopg.Connection) -> ServerSettings:
        timeout = self.endpoint.query_timeout
        with deadline(conn, timeout):
            rows = conn.execute(SETTINGS_SQL).fetchall()
            values: dict[str, str] = {name: setting for name, setting, _, _ in rows}
            hidden = {
                name: (source, boot)
                for name, _, source, boot in rows
                if name in TIMEOUTS and source not in SERVER_SOURCES
            }
            masked: tuple[tuple[str, str], ...] = ()
            if hidden:
                values, masked = self._server_values(conn, values, hidden)
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
            masked=masked,
        )
        self.log.debug(
            "PostgreSQL %s: max_connections=%d, reserved=%d",
            settings.version, settings.max_connections, settings.reserved_slots,
        )  # fmt: skip
        return settings

    @staticmethod
    def _server_values(
        conn: psycopg.Connection, values: dict[str, str], hidden: dict[str, tuple[str, str]]
    ) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
        """The server-wide values of settings the session's own (its role's, its database's) hides: from
        the configuration files where the role may read them, else the compiled-in default; or, where it
        may not, the settings left ``masked`` with their source."""
        if not _scalar(conn, FILE_SETTINGS_READABLE_SQL):
            return values, tuple((name, source) for name, (source, _) in sorted(hidden.items()))
        found: dict[str, str] = dict(conn.execute(FILE_SETTINGS_SQL, {"names": list(hidden)}).fetchall())
        server = {
            name: str(_milliseconds(found[name])) if name in found else boot for name, (_, boot) in hidden.items()
        }
        return {**values, **server}, ()


def _milliseconds(value: str) -> int:
    """A time setting as a configuration file writes it ('30s', '1min', '500'): milliseconds."""
    units = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
    text = value.strip().strip("'").strip()
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz").strip()
    unit = text[len(number) :].strip() or "ms"
    try:
        return int(float(number) * units[unit])
    except (KeyError, ValueError):
        return 0


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
