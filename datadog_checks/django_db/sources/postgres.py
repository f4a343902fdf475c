"""PostgreSQL source: one persistent connection, one snapshot of plain data per run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, LiteralString

import psycopg
from psycopg import sql

from ..addresses import addresses_of
from ..connection import Reconnecting, deadline
from ..owners import is_poolers
from ..quiet import LastUse, is_monitoring, may_be_quiet, youngest
from ..records import (
    PROVIDER,
    PROVIDER_APP,
    ActivityGroup,
    DatabaseSessions,
    LeakSuspect,
    PgSnapshot,
    PoolerKeys,
    Quiet,
    ServerAddress,
    ServerSettings,
    milliseconds,
)
from ..settings import AppProfile, Endpoint, profile_for

# Client backends, and rows the monitoring role may not see in full (their backend_type
# is NULL then): of those, only sessions tied to a database can be client backends.
CLIENT_BACKENDS = (
    "pid <> pg_backend_pid() AND (backend_type = 'client backend' OR (backend_type IS NULL AND datid IS NOT NULL))"
)

# db, user and app are always grouped on (and folded later); the client address only on request.
CLIENT_ADDR = "host(client_addr)"

# Grouped on datid and usesysid, not on names: reading only the function's own columns lets
# the planner drop the view's joins to pg_database and pg_authid, which would cost as much
# again as the scan itself. Names come from a cache (see PostgresSource.db_names and user_names).
# `leaked` counts backends whose state changed before each leak threshold in use (one per CONN_MAX_AGE of
# the application profiles), a column each, the group's own picked afterwards by its application name: an
# idle group's are its leaks. The state is a grouping key: tested once per group afterwards, not per row.
# Per row only comparisons: the leak cutoffs are computed once (sub-selects), the previous run's time
# is a parameter, ages once per group (the oldest timestamp, subtracted from now()).
# Only what varies is grouped on: a column that is a constant in this configuration (the client address
# not asked for, the pooler column without a pooler to tell) would be hashed for every row.
# The constant xid among the grouping keys changes no group; xid has no sort order, so the planner
# hashes rather than sorting every backend's row on text keys, which it would otherwise pick from
# its estimate of one row past the WHERE clause (at 2,000 backends, the sort was about half of what the
# statement costs beyond reading pg_stat_activity).
# With a few hundred backends or fewer, each expression's setup in every execution counts as much as
# the rows: no array, and date_part (float8) rather than extract (numeric from PostgreSQL 14) and a cast.
ACTIVITY_SQL = """
SELECT state, datid, usesysid, application_name, {extra} AS client_addr, {pooler} AS pooler,
       count(*) AS n,
       count(*) FILTER (WHERE wait_event_type = 'Lock') AS waiting_on_lock,
       date_part('epoch', now() - min(CASE WHEN state = 'active' THEN query_start ELSE state_change END)) AS max_age,
       count(*) FILTER (WHERE backend_start > %(since)s) AS opened,
       date_part('epoch', now() - max(state_change)) AS min_age,
       date_part('epoch', now()) AS now,
       {server_keys} AS server_keys, {server_idle} AS server_idle,
       {leaked}{sessions}
FROM pg_stat_activity
WHERE {client_backends}
GROUP BY 1, 2, 3, 4{varying}, '0'::xid
"""

# Columns of the statement's rows, by position; the leak counts from LEAKED on, one per threshold,
# then (PostgreSQL 14 and later) a database's sessions.
(STATE, DATID, USESYSID, APP, CLIENT, POOLER, N, WAITING, MAX_AGE, OPENED, MIN_AGE, NOW, SERVER_KEYS, SERVER_IDLE,
 LEAKED) = range(15)  # fmt: skip
AS_READ = MIN_AGE  # a group's leading columns, STATE to OPENED, taken as they are

# Whose backends they are (records.DIRECT, HELD, POOLER_OWN, EXTERNAL; owners.py says what each counts in).
# With a pgbouncer section, from PgBouncer's server connections (SHOW SERVERS) by their identity: a backend's key
# (pid * 65536 plus the client port, 0 over a Unix socket) first, a cheap test of every row against the int8
# array `pids`; then, of the few that pass, the key with the client address (`<key>@<address>`) against the
# text arrays `held` and `own`. Arrays, one type whatever they hold: the statement stays prepared once; made
# once per execution (a sub-select), not once per row. With pooler_addresses, a backend connected from one of
# those networks is a pooler's the check does not read.
BACKEND_KEY = "(pid::int8 * 65536 + greatest(client_port, 0))"
IDENTITY = f"({BACKEND_KEY}::text || '@' || coalesce(host(client_addr), ''))"
PIDS = "(SELECT %(pids)s::int8[])::int8[]"
HELD_KEYS, OWN_KEYS = "(SELECT %(held)s::text[])::text[]", "(SELECT %(own)s::text[])::text[]"
NETWORKS = "(SELECT %(networks)s::inet[])::inet[]"
EXTERNAL_SQL = f"CASE WHEN client_addr <<= ANY({NETWORKS}) THEN 3 ELSE 0 END"
PGBOUNCER_SQL = (
    f"CASE WHEN {BACKEND_KEY} = ANY({PIDS}) THEN CASE WHEN {IDENTITY} = ANY({HELD_KEYS}) THEN 1 "
    f"WHEN {IDENTITY} = ANY({OWN_KEYS}) THEN 2 ELSE {{rest}} END ELSE {{rest}} END"
)
# PgBouncer's server connections with how long each is idle (-1: not idle): its overdue ones, pool by pool, and
# whether its connections are found at all. Only the few rows whose key is one of PgBouncer's are aggregated.
OF_PGBOUNCER = f"FILTER (WHERE {BACKEND_KEY} = ANY({PIDS}))"
SERVER_KEYS_SQL = f"array_agg({BACKEND_KEY}) {OF_PGBOUNCER}"
SERVER_IDLE_SQL = (
    "array_agg(CASE WHEN state = 'idle' THEN date_part('epoch', now() - state_change) ELSE -1 END) " + OF_PGBOUNCER
)


def pooler_sql(pgbouncer: bool, networks: bool) -> str:
    """The statement's ``pooler`` column: 0 (an application's) unless a PgBouncer or pooler_addresses says."""
    rest = EXTERNAL_SQL if networks else "0"
    return PGBOUNCER_SQL.format(rest=rest) if pgbouncer else rest


# From PostgreSQL 14, the sessions of each database come in the same statement, one row per database
# below the groups (their `n` NULL, every column NULL but datid, now and the sessions): one round trip,
# one prepared statement, no pipeline to drive.
# Template databases (template0, template1) are left out: nobody's application works in them.
# pg_stat_database's own functions, on pg_database: the view would add its row of shared objects, joined away.
SESSIONS_COLUMNS = ", NULL::int8 AS sessions, NULL::int8, NULL::int8, NULL::int8"
DATABASE_SQL = """
UNION ALL
SELECT NULL, oid, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, date_part('epoch', now()), NULL, NULL,
       {no_leaks}
       pg_stat_get_db_sessions(oid), pg_stat_get_db_sessions_abandoned(oid), pg_stat_get_db_sessions_fatal(oid),
       pg_stat_get_db_sessions_killed(oid)
FROM pg_database WHERE NOT datistemplate
"""

# The providers' settings come by current_setting: RDS's extension defines them, and a server without it keeps a
# postgresql.conf entry as a placeholder, which pg_settings does not list. Azure's server announces azure.extensions.
PROVIDER_SETTINGS = ("rds.rds_superuser_reserved_connections", "rds.rds_reserved_connections")
AZURE_SETTING = "azure.extensions"
SETTINGS_SQL = """
SELECT name, setting, source, boot_val FROM pg_settings
WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections',
               'server_version_num', 'server_version', 'statement_timeout', 'idle_in_transaction_session_timeout',
               'log_line_prefix')
UNION ALL
SELECT name, current_setting(name, true), 'provider', NULL
FROM unnest(ARRAY[{provider_settings}]) name
WHERE current_setting(name, true) IS NOT NULL
""".format(provider_settings=", ".join(f"'{name}'" for name in (*PROVIDER_SETTINGS, AZURE_SETTING)))

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
# as a superuser, else those of the roles it has the privileges of. Read once per connection, with the
# server's pid of the session, which tells a direct connection from one through a pooler.
VISIBILITY_SQL = """
SELECT pg_has_role('pg_read_all_stats', 'USAGE'),
       ARRAY(SELECT oid FROM pg_roles WHERE pg_has_role(oid, 'USAGE'))::oid[],
       pg_backend_pid(), host(inet_server_addr()), current_setting('port')::int,
       date_part('epoch', pg_postmaster_start_time())
"""

# A backend the role sees in full but whose state is still NULL has not finished starting
# (before its first ReadyForQuery): PostgreSQL 18 names that state itself.
STARTING = "starting"

LEAKED_SQL = "count(*) FILTER (WHERE state_change < (SELECT now() - make_interval(secs => %(leak{i})s))) AS leaked{i}"

# The idle connections of quiet applications (see quiet.py) past their shortest threshold, each with its idle
# time: read only when one of them has a connection idle longer than its threshold plus its quiet time, rare.
QUIET_IDLE_SQL = """
SELECT COALESCE(application_name, ''), datid, usesysid, {extra}, {pooler},
       date_part('epoch', now() - state_change)
FROM pg_stat_activity
WHERE {client_backends} AND state = 'idle' AND COALESCE(application_name, '') = ANY(%(quiet)s::text[])
      AND state_change < now() - make_interval(secs => %(leak)s)
"""

LEAK_SUSPECTS_SQL = """
SELECT COALESCE(application_name, ''), COALESCE(host(client_addr), 'local'), datname, usename,
       extract(epoch FROM now() - state_change)::float8, query
FROM pg_stat_activity
WHERE {client_backends} AND state = 'idle' AND state_change < now() - make_interval(secs => %(leak)s)
      AND {pooler} IN (0, 1)
ORDER BY state_change
LIMIT 50
"""


# The previous run's time on a first run: no backend started after it.
NEVER = datetime.max.replace(tzinfo=UTC)

# Don't let a cache keyed on client-chosen names grow without bound.
MAX_CACHED_APPS = 4096


class PostgresSource(Reconnecting):
    def __init__(
        self,
        endpoint: Endpoint,
        group_by: tuple[str, ...],
        leak_idle_seconds: float,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
        apps: tuple[AppProfile, ...] = (),
        want_suspects: bool = False,
        pooler: bool = False,
        networks: tuple[str, ...] = (),
        providers: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset()),
    ):
        """``apps``: the profiles whose leak thresholds their applications use (the first match wins);
        others use ``leak_idle_seconds``. ``want_suspects``: read the leaked connections' last queries too.
        ``pooler``: PgBouncer fronts this server and its server connections are told apart (``servers``).
        ``networks``: pooler_addresses, where backends connected from are a pooler's the check does not read.
        ``providers``: the roles and databases of a managed service's own sessions (provider_sessions)."""
        self.endpoint = endpoint
        self.want_suspects = want_suspects
        self.since: float | None = None  # the server's time at the previous snapshot
        # PgBouncer's server connections, as the last read of its console found them; None without one.
        self.servers: Callable[[ServerAddress], PoolerKeys] | None = None
        self.leak_idle_seconds = leak_idle_seconds
        self.apps = apps
        self.thresholds = sorted({leak_idle_seconds, *(app.leak_idle_seconds for app in apps)})
        self.log = log
        by_client = "client_addr" in group_by
        extra = CLIENT_ADDR if by_client else "''"
        leaked = ", ".join(LEAKED_SQL.format(i=i) for i in range(len(self.thresholds)))
        whose = pooler_sql(pooler, bool(networks))
        varying = (", 5" if by_client else "") + (", 6" if pooler or networks else "")  # else constants
        activity = {
            "extra": extra, "client_backends": CLIENT_BACKENDS, "leaked": leaked, "pooler": whose, "varying": varying,
            "server_keys": SERVER_KEYS_SQL if pooler else "NULL::int8[]",
            "server_idle": SERVER_IDLE_SQL if pooler else "NULL::float8[]",
        }  # fmt: skip
        self.activity_sql = ACTIVITY_SQL.format(**activity, sessions="")
        no_leaks = "NULL, " * len(self.thresholds)
        self.activity_sessions_sql = ACTIVITY_SQL.format(**activity, sessions=SESSIONS_COLUMNS) + DATABASE_SQL.format(
            no_leaks=no_leaks
        )
        self.sessions_at = LEAKED + len(self.thresholds)  # the column of a database's sessions
        self.suspects_sql = LEAK_SUSPECTS_SQL.format(client_backends=CLIENT_BACKENDS, pooler=whose)
        self.quiet_sql = QUIET_IDLE_SQL.format(client_backends=CLIENT_BACKENDS, pooler=whose, extra=extra)
        # The statement's parameters but the previous run's time and PgBouncer's servers, which each run sets.
        self.params: dict[str, Any] = {"leak": self.thresholds[0], "since": NEVER}
        self.params.update({"held": "{}", "own": "{}", "pids": "{}", "networks": array(networks)})
        self.params.update({f"leak{i}": seconds for i, seconds in enumerate(self.thresholds)})
        self.settings: ServerSettings | None = None
        # The activity statement's cursor on the open connection, kept: its result loaders are found once.
        # Binary results: numbers and arrays without parsing their text.
        self.cursor: psycopg.Cursor[Any] | None = None
        self.db_names: dict[int, str] = {}  # oid: name
        self.user_names: dict[int, str] = {}  # oid: name
        self.sees_all = True  # the role sees every backend in full (pg_read_all_stats or superuser)
        self.visible_roles: frozenset[int] = frozenset()  # else, the roles whose backends it sees in full
        self.templates: frozenset[int] = frozenset()  # oids of the template databases
        self.providers = providers
        self.provider_oids: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset())  # roles, databases
        self.direct = True  # the connection reaches PostgreSQL itself, no pooler in between
        self.leak_index: dict[str, int] = {}  # application_name: the index of its threshold in `leaked`
        self.last_use = LastUse()  # when each application last used a connection, as the runs saw it
        self.started_at: float | None = None  # pg_postmaster_start_time(), as the last connection read it
        self.address = ServerAddress(frozenset(), endpoint.port, False)  # where the connection reaches the server

    def snapshot(self) -> PgSnapshot:
        """Read the server; a connection found broken is opened again at once, any other failure next run.
        Backends that started since the previous snapshot count as opened; those ``servers`` names are
        PgBouncer's server connections to the server the connection reaches (the source's pooler)."""
        snapshot = self.read(lambda: self._snapshot(self.since, self.want_suspects, self.servers))
        self.since = snapshot.server_time
        return snapshot

    def _snapshot(
        self, since: float | None, want_suspects: bool, servers: Callable[[ServerAddress], PoolerKeys] | None
    ) -> PgSnapshot:
        new = self.conn is None or self.conn.closed
        if new:
            self.settings = self._read_settings(self.open())
            self._read_visibility(self.conn)
            assert self.conn is not None
            self.cursor = self.conn.cursor(binary=True)
        assert self.conn is not None and self.cursor is not None and self.settings is not None
        conn, settings = self.conn, self.settings
        timeout = self.endpoint.query_timeout + 1  # the server's statement_timeout normally answers first
        params = self.params
        # A time no backend started after: none counts as opened at first.
        params["since"] = NEVER if since is None else datetime.fromtimestamp(since, UTC)
        if servers is not None:  # else none, for the source's life: the empty arrays it started with stay
            keys = servers(self.address)
            params["held"], params["own"], params["pids"] = array(keys.held), array(keys.own), array(keys.pids)
        with_sessions = settings.version_num >= 140000
        with deadline(conn, timeout):
            statement = self.activity_sessions_sql if with_sessions else self.activity_sql
            every = self.cursor.execute(statement, params, prepare=True if self.direct else None).fetchall()
            rows = [r for r in every if r[N] is not None]
            if new or self._unnamed(every, rows):
                self._read_names(conn)
            roles, dbs = self.provider_oids
            if roles or dbs:  # a managed service's own sessions: never an application's
                rows = [_as_provider(r) if r[USESYSID] in roles or r[DATID] in dbs else r for r in rows]
            # Only an idle group has leaks. A pooler's server connections are no application's leak: PgBouncer's
            # overdue ones stand instead; nor a monitoring session's.
            index = self.leak_threshold
            leaked = [
                r[LEAKED + index(a)]
                if r[STATE] == "idle" and not is_poolers(r[POOLER]) and not is_monitoring(a := r[APP] or "")
                else 0
                for r in rows
            ]
            now = every[0][NOW] if every else None
            quiet, kept = self._quiet(conn, rows, leaked, params, now or 0.0)
            suspects: tuple[LeakSuspect, ...] = ()
            if want_suspects and any(leaked):
                found = (
                    LeakSuspect(*row)
                    for row in conn.execute(self.suspects_sql, params).fetchall()
                    if row[3] not in self.providers[0] and row[2] not in self.providers[1]
                )
                suspects = tuple(s for s in found if s.idle_seconds > self.leak_seconds(s.app) + quiet.get(s.app, 0))
            server_time = now if now is not None else _scalar(conn, "SELECT extract(epoch FROM now())::float8")
        databases = self._databases(every) if with_sessions else None
        db_names, user_names = self.db_names, self.user_names
        templates, sees_all, visible = self.templates, self.sees_all, self.visible_roles
        groups = []
        on_templates = 0
        for r, leak in zip(rows, leaked, strict=True):
            state, datid, usesysid, app, client_addr, pooler, n, waiting, max_age, opened = r[:AS_READ]
            if datid in templates:
                on_templates += n
                continue
            # A NULL state is `starting` where the role sees the backend in full, else hidden.
            if state is None and (sees_all or usesysid in visible):
                state = STARTING
            server_keys = r[SERVER_KEYS]
            pooled = tuple(zip(server_keys, r[SERVER_IDLE], strict=True)) if server_keys else ()
            db, user = db_names.get(datid, ""), user_names.get(usesysid, "")
            age = max_age if max_age is not None and max_age > 0 else 0.0
            group = (state, db, user, app or "", client_addr or "", n, waiting, leak, age, opened, pooler, pooled)
            groups.append(ActivityGroup._make(group))
        return PgSnapshot(settings, tuple(groups), databases, server_time, new, suspects, on_templates, kept)

    def _unnamed(self, every: list[Any], rows: list[Any]) -> bool:
        """Whether a database or a role of the statement's rows has no name in the caches yet."""
        return not (
            {r[DATID] for r in every if r[DATID]} <= self.db_names.keys()
            and {r[USESYSID] for r in rows if r[USESYSID]} <= self.user_names.keys()
        )

    def _read_names(self, conn: psycopg.Connection) -> None:
        """The names of the databases and roles, by oid; the template databases; the providers' oids."""
        names = conn.execute(NAMES_SQL).fetchall()
        self.db_names = db_names = {oid: name for kind, oid, name, _ in names if kind == "db"}
        self.user_names = user_names = {oid: name for kind, oid, name, _ in names if kind == "user"}
        self.templates = frozenset(oid for kind, oid, _, template in names if template)
        self.provider_oids = (
            frozenset(oid for oid, name in user_names.items() if name in self.providers[0]),
            frozenset(oid for oid, name in db_names.items() if name in self.providers[1]),
        )

    def _databases(self, every: list[Any]) -> tuple[DatabaseSessions, ...]:
        """The sessions of each database but the providers', from the statement's rows below the groups."""
        at, names, provider_dbs = self.sessions_at, self.db_names, self.provider_oids[1]
        return tuple(
            DatabaseSessions(names.get(r[DATID], ""), r[at] or 0, r[at + 1] or 0, r[at + 2] or 0, r[at + 3] or 0)
            for r in every
            if r[N] is None and r[DATID] not in provider_dbs
        )

    def _quiet(
        self, conn: psycopg.Connection, rows: list[Any], leaked: list[int], params: dict[str, Any], now: float
    ) -> tuple[dict[str, float], tuple[Quiet, ...]]:
        """The leaks of quiet applications taken back (``leaked`` changed in place) where they went idle only as
        their application went quiet (quiet.py); the quiet times, and the applications left without a leak."""
        ages = youngest(
            (r[APP] or "", (r[MIN_AGE] or 0.0) if r[STATE] == "idle" else 0.0)
            for r in rows
            if not is_poolers(r[POOLER])
        )
        quiet = self.last_use.quiet(ages, self.threshold_of, now)
        if not quiet or not any(leaked):
            return quiet, ()
        held: dict[str, int] = {}
        for r in rows:
            held[r[APP] or ""] = held.get(r[APP] or "", 0) + r[N]
        quiet = {app: age for app, age in quiet.items() if may_be_quiet(self.apps, app, held[app])}
        recount = []
        for i, r in enumerate(rows):
            app = r[APP] or ""
            if leaked[i] and app in quiet:
                if (r[MAX_AGE] or 0.0) <= self.threshold_of(app) + quiet[app]:
                    leaked[i] = 0
                else:
                    recount.append(i)
        if recount:  # some went idle before the application went quiet: count those exactly
            apps = sorted({rows[i][APP] or "" for i in recount})
            found: dict[tuple[Any, ...], int] = {}
            for app, datid, usesysid, client, pooler, idle in conn.execute(
                self.quiet_sql, {**params, "quiet": apps}
            ).fetchall():
                if idle > self.threshold_of(app) + quiet[app]:
                    key = (app, datid, usesysid, client or "", pooler)
                    found[key] = found.get(key, 0) + 1
            for i in recount:
                r = rows[i]
                leaked[i] = found.get((r[APP] or "", r[DATID], r[USESYSID], r[CLIENT] or "", r[POOLER]), 0)
        left = {r[APP] or "" for i, r in enumerate(rows) if leaked[i]}
        kept = tuple(
            Quiet(app, seconds, held[app])
            for app, seconds in sorted(quiet.items())
            if app not in left
            and any(r[LEAKED + self.leak_threshold(app)] for r in rows if (r[APP] or "") == app and r[STATE] == "idle")
        )
        return quiet, kept

    def threshold_of(self, application_name: str) -> float:
        """The application's leak threshold, as ``leak_seconds`` gives it, found once per name."""
        return self.thresholds[self.leak_threshold(application_name)]

    def leak_threshold(self, application_name: str) -> int:
        """The index of the application's leak threshold in ``thresholds`` (and in a row's ``leaked``)."""
        index = self.leak_index.get(application_name)
        if index is None:
            if len(self.leak_index) >= MAX_CACHED_APPS:
                self.leak_index.clear()
            index = self.leak_index[application_name] = self.thresholds.index(self.leak_seconds(application_name))
        return index

    def _read_visibility(self, conn: psycopg.Connection | None) -> None:
        assert conn is not None
        with deadline(conn, self.endpoint.query_timeout):
            row = conn.execute(VISIBILITY_SQL).fetchone()
        assert row is not None
        self.sees_all, self.visible_roles = bool(row[0]), frozenset(int(oid) for oid in row[1] or ())
        # A pooler (PgBouncer, ...) hands out a process id of its own. In its transaction mode the next
        # statement may reach another server connection, where a statement prepared on this one does not
        # exist: through a pooler, nothing is prepared. Straight to PostgreSQL, the activity statement is
        # prepared from the first run: its parsing and planning are not repeated.
        self.direct = row[2] == conn.info.backend_pid
        # Where PgBouncer's server connections must talk to, to be to this server.
        self.address = ServerAddress(addresses_of(self.endpoint.host, row[3]), int(row[4]), row[3] is None)
        # A server that started again since the previous connection restarted: said once (``restarted``).
        if self.started_at is not None and row[5] != self.started_at:
            self.restarted = "its start time moved: pg_postmaster_start_time()"
        self.started_at = row[5]
        if not self.direct:
            conn.prepare_threshold = None

    def leak_seconds(self, application_name: str) -> float:
        profile = profile_for(self.apps, application_name)
        return profile.leak_idle_seconds if profile is not None else self.leak_idle_seconds

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
            provider_reserved=tuple((name, _count(values[name])) for name in PROVIDER_SETTINGS if name in values),
            azure=AZURE_SETTING in values,
            version_num=int(values["server_version_num"]),
            version=values["server_version"],
            max_connections=int(values["max_connections"]),
            superuser_reserved=int(values["superuser_reserved_connections"]),
            reserved=int(values.get("reserved_connections", 0)),
            statement_timeout_ms=int(values["statement_timeout"]),
            idle_in_transaction_timeout_ms=int(values["idle_in_transaction_session_timeout"]),
            role_settings=role_settings,
            masked=masked,
            log_line_prefix=values.get("log_line_prefix", ""),
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
        server = {name: str(milliseconds(found[name])) if name in found else boot for name, (_, boot) in hidden.items()}
        return {**values, **server}, ()


def array(values: tuple[int, ...] | tuple[str, ...]) -> str:
    """An array literal of keys or networks (digits, ``@``, ``/``, an address's digits, dots and colons, networks
    validated at start: nothing to quote): one parameter of one type whatever they are, so the statement is
    prepared once."""
    return "{" + ",".join(map(str, values)) + "}"


def _as_provider(row: Any) -> Any:
    """A row of the activity statement as a managed service's own: its application PROVIDER_APP, its owner PROVIDER."""
    return (*row[:APP], PROVIDER_APP, *row[APP + 1 : POOLER], PROVIDER, *row[POOLER + 1 :])


def _count(value: str) -> int:
    """A number of slots as a setting holds it; a placeholder that is not one counts none."""
    try:
        return max(0, int(value.strip()))
    except ValueError:
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
