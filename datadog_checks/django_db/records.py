"""Typed records: what the sources read, as the evaluation consumes it. Imports no driver.

Each record is normalised once, in its source: column aliases, units, defaults and the
PgBouncer admin database are resolved there, so no evaluation module looks at raw rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

# -- Errors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """An error met on a connection to a server, in plain values."""

    text: str  # as the client library words it
    sqlstate: str | None = None
    message: str = ""  # the server's primary message; else the client library's own words, without the address
    timeout: bool = False  # the check's own deadline, or connect_timeout, ran out
    errno: int | None = None  # a MySQL error's number


def milliseconds(value: str) -> int:
    """A time setting as a configuration file writes it ('30s', '1min', '500'): milliseconds."""
    units = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
    text = value.strip().strip("'").strip()
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz").strip()
    unit = text[len(number) :].strip() or "ms"
    try:
        return int(float(number) * units[unit])
    except (KeyError, ValueError):
        return 0


# -- PostgreSQL ------------------------------------------------------------------------------


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
    # (setting, pg_settings.source) of the timeouts whose server-wide value the monitoring session could
    # not read: its own role or database setting masks it, and pg_file_settings is closed to it. The
    # *_ms fields above then hold nothing but the session's value, which says nothing of other roles.
    masked: tuple[tuple[str, str], ...] = ()
    log_line_prefix: str = ""  # where the server's log lines carry the application's name (%a)
    # RDS's own reserves: rds.rds_superuser_reserved_connections and rds.rds_reserved_connections
    provider_reserved: tuple[tuple[str, int], ...] = ()
    azure: bool = False  # an Azure Flexible Server (it announces azure.extensions)

    # Made once (read several times a run): cached_property writes past the frozen fields.
    @cached_property
    def reserved_slots(self) -> int:
        """Every slot ordinary roles cannot take: the server's reserves and the provider's. Azure keeps 15 of
        max_connections for its replication and monitoring whatever the reserve settings say, so there the
        larger of the two counts (its announced reserves are among those 15)."""
        announced = self.superuser_reserved + self.reserved + sum(n for _, n in self.provider_reserved)
        return max(announced, AZURE_RESERVED) if self.azure else announced

    @cached_property
    def usable_slots(self) -> int:
        return max(0, self.max_connections - self.reserved_slots)


AZURE_RESERVED = 15  # Azure Database for PostgreSQL Flexible Server: "reserves 15 connections"


class ActivityGroup(NamedTuple):
    state: str | None  # as pg_stat_activity names it; None when the role may not see it
    db: str
    user: str
    app: str
    client_addr: str
    count: int  # type: ignore[assignment]  # the field, not tuple.count: the groups are never counted in
    waiting_on_lock: int = 0
    leaked: int = 0
    max_age: float = 0.0  # seconds in the state; for active, since query_start
    opened: int = 0  # backends started after the previous snapshot
    pooler: int = 0  # DIRECT, HELD, POOLER_OWN, EXTERNAL or PROVIDER: whose connections these backends are
    # PgBouncer's server connections among them: (key, seconds idle, -1 when not idle), as PoolerKeys.pids names them
    servers: tuple[tuple[int, float], ...] = ()


# ActivityGroup.pooler: who holds the backends (owners.py says what each counts in). PgBouncer's server
# connections carry the application_name of the last client PgBouncer lent them to; they are PgBouncer's own
# (POOLER_OWN) unless a client of a session-mode pool holds them, which makes them that application's connection
# as much as a direct one (HELD). EXTERNAL: connected from a pooler_addresses network, a pooler the check does
# not read (sidecars, a managed pooler). PROVIDER: a managed service's own session (rdsadmin, azuresu, ...),
# its role or database one of provider_sessions; its application_name is replaced by PROVIDER_APP.
DIRECT, HELD, POOLER_OWN, EXTERNAL, PROVIDER = 0, 1, 2, 3, 4
PROVIDER_APP = "provider"


@dataclass(frozen=True)
class ServerAddress:
    """Where the monitoring connection reaches PostgreSQL: what PgBouncer's servers must talk to, to be its."""

    addresses: frozenset[str]  # IP addresses, normalised: the configured host if one, and the server's side
    port: int  # the server's port setting
    socket: bool  # the monitoring connection came over a Unix socket


@dataclass(frozen=True)
class PoolerKeys:
    """PgBouncer's server connections, as the identity of the backends they are: ``pid:port@address``, the
    backend's pid with the client port and address PostgreSQL sees (``pid:0@`` over a Unix socket), which are
    PgBouncer's ``remote_pid``, ``local_port`` and ``local_addr``; ``pids`` the first part, pid * 65536 plus the
    port, a cheap first test of every backend."""

    held: tuple[str, ...] = ()  # held by a client of a session-mode pool
    own: tuple[str, ...] = ()  # PgBouncer's own: idle, or lent for a transaction
    pids: tuple[int, ...] = ()


class DatabaseSessions(NamedTuple):
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


class Quiet(NamedTuple):
    """An application (a MySQL user) with connections idle past its leak threshold, none of them its leak: it
    went quiet (quiet.py)."""

    who: str
    seconds: float  # since it last used any of its connections
    kept: int  # connections it keeps


@dataclass(frozen=True)
class PgSnapshot:
    """What one run read. Template databases (datistemplate) are left out of the groups and of
    the sessions, as no application works in them; their backends count in utilisation only."""

    settings: ServerSettings
    groups: tuple[ActivityGroup, ...]
    databases: tuple[DatabaseSessions, ...] | None  # None before PostgreSQL 14
    server_time: float  # epoch seconds on the server when the snapshot was taken
    new_connection: bool
    leak_suspects: tuple[LeakSuspect, ...] = ()
    template_backends: int = 0  # client backends on template databases, left out of the groups
    quiet: tuple[Quiet, ...] = ()  # applications whose idle connections are kept, not leaked (quiet.py)


# -- PgBouncer -------------------------------------------------------------------------------

ADMIN_DB = "pgbouncer"  # the admin console's own database: never an application's pool


class PgbPool(NamedTuple):
    """A SHOW POOLS row; a column the server's version lacks is None."""

    db: str
    user: str
    pool_mode: str  # the row's, else its database's, else the server's default; "unknown" if none says
    pool_size: float | None  # the database's own pool size, else default_pool_size
    cl_active: float | None = None
    cl_waiting: float | None = None
    cl_active_cancel_req: float | None = None
    cl_waiting_cancel_req: float | None = None
    sv_active: float | None = None
    sv_active_cancel: float | None = None
    sv_being_canceled: float | None = None
    sv_idle: float | None = None
    sv_used: float | None = None
    sv_tested: float | None = None
    sv_login: float | None = None
    maxwait: float | None = None  # seconds: maxwait plus maxwait_us


class PgbDatabase(NamedTuple):
    """A SHOW DATABASES row."""

    name: str
    pool_mode: str | None
    pool_size: float | None  # as configured; -1 means default_pool_size
    reserve_pool_size: float | None  # reserve_pool before 1.24
    max_connections: float | None
    current_connections: float | None
    paused: float | None
    disabled: float | None
    min_pool_size: float | None = None  # from 1.18; -1 or None: the server's min_pool_size


class PgbStats(NamedTuple):
    """A SHOW STATS row: counters since PgBouncer started, times in seconds."""

    db: str
    transactions: float | None
    queries: float | None  # total_requests before 1.8
    bytes_received: float | None
    bytes_sent: float | None
    xact_time: float | None
    query_time: float | None
    wait_time: float | None


@dataclass(frozen=True)
class PgbConfig:
    """The SHOW CONFIG values the check uses; None when the server does not say."""

    max_client_conn: float | None = None
    default_pool_size: float | None = None
    reserve_pool_size: float | None = None
    min_pool_size: float | None = None
    max_db_connections: float | None = None
    pool_mode: str | None = None
    server_idle_timeout: float | None = None
    client_idle_timeout: float | None = None
    max_prepared_statements: float | None = None  # 1.21 and later: protocol-level prepared statements kept
    server_lifetime: float | None = None


class PgbServer(NamedTuple):
    """A SHOW SERVERS row: one of PgBouncer's connections to a PostgreSQL server."""

    db: str
    user: str
    state: str  # active (a client holds it), idle, used, tested, new
    addr: str  # the PostgreSQL server's address; "unix" over a socket
    port: int | None
    local_port: int | None  # over TCP, the port PostgreSQL sees as client_port
    remote_pid: int | None  # the PostgreSQL backend's pid
    linked: bool  # a client holds it
    app: str  # the last client's application_name (from 1.18)
    local_addr: str = ""  # over TCP, the address PostgreSQL sees as client_addr; "unix" over a socket


@dataclass(frozen=True)
class PgbNames:
    """The database and user names a snapshot's rows carry, the admin database left out, each read from
    its column alone: what bounding their tag values needs, without making the records. Each may be
    read any number of times, in the order PgBouncer lists them."""

    pool_dbs: Iterable[str]
    databases: Iterable[str]
    stats_dbs: Iterable[str]
    pool_users: Iterable[str]


class PgbClientGroup(NamedTuple):
    """SHOW CLIENTS rows alike in every field the check reads, counted. The admin database's are left out."""

    db: str
    user: str
    app: str  # application_name; "" when the client set none, and before 1.18, which has no such column
    state: str  # as PgBouncer says it: active, waiting, idle (1.25 on); before 1.25 an idle client is active
    addr: str  # the client's host
    request_time: str  # the client's last request, as PgBouncer writes it: "2026-12-04 23:58:30 UTC"
    linked: bool  # holds a server connection (link)
    connections: int


@dataclass(frozen=True)
class PgbClients:
    """One SHOW CLIENTS, aggregated as it was read."""

    groups: tuple[PgbClientGroup, ...]
    now: str  # the newest request_time of all clients: the console's own SHOW CLIENTS, PgBouncer's clock now
    has_app: bool  # the version has the application_name column (1.18 on)
    total: int = 0  # every client connection, the admin console's included


@dataclass(frozen=True)
class PgbSnapshot:
    """pools, databases and stats may be read any number of times, one pass inside another included;
    the source may make their records afresh on each pass from the rows the server sent, so that a
    PgBouncer with thousands of pools costs no more memory than one with ten. The admin database
    is left out of all three."""

    pools: Iterable[PgbPool]
    databases: Iterable[PgbDatabase]
    stats: Iterable[PgbStats]
    lists: dict[str, int]
    config: PgbConfig
    version: str | None
    new_connection: bool = False
    names: PgbNames | None = None  # None: read them from the records
    clients: PgbClients | None = None  # None: SHOW CLIENTS was not read
    servers: tuple[PgbServer, ...] = ()  # SHOW SERVERS, read only when a postgres section is configured too


# -- Django processes (Prometheus endpoints) -------------------------------------------------


@dataclass(frozen=True)
class DjangoAlias:
    """What one endpoint says of one database alias: counters since its processes started."""

    alias: str
    new_connections: float = 0.0  # attempts: django-prometheus counts before connecting
    connection_errors: float = 0.0
    queries: float = 0.0  # django_db_execute_total, bulk executions included
    errors: tuple[tuple[str, float], ...] = ()  # (exception class name, count)


@dataclass(frozen=True)
class DjangoPool:
    """A Django 5.1 pool's get_stats() as exposed by the processes (the README's collector)."""

    alias: str
    size: float | None = None
    available: float | None = None
    max_size: float | None = None
    requests_waiting: float | None = None
    timeouts: float | None = None  # counter: requests that got no connection (requests_errors)
    connections: float | None = None  # counter: physical connections the pool opened (connections_num)
    min_size: float | None = None  # the connections it keeps open however idle (pool_min)


@dataclass(frozen=True)
class DjangoScrape:
    """One read of one endpoint."""

    url: str  # without credentials or query string
    app: str
    time: float  # monotonic seconds when read
    aliases: tuple[DjangoAlias, ...]
    pools: tuple[DjangoPool, ...] = ()


@dataclass(frozen=True)
class DjangoScrapeFailure:
    """A read of one endpoint that failed: refused, timed out, an HTTP error, or not django-prometheus text."""

    url: str  # without credentials or query string
    app: str
    problem: str  # connection_refused, connect_timeout, tls_error, http_status, bad_exposition
    detail: str  # safe to show: never the URL's credentials or the page's text


# -- MySQL and MariaDB -----------------------------------------------------------------------


@dataclass(frozen=True)
class MysqlVariables:
    """The server's global variables the check uses, read every run (SET GLOBAL changes them live)."""

    version: str  # e.g. "10.11.6-MariaDB-0+deb12u1" or "8.0.36"
    max_connections: int  # ordinary clients; one more is kept for SUPER / CONNECTION_ADMIN
    wait_timeout: int  # seconds before the server closes an idle non-interactive client
    interactive_timeout: int  # the same for clients that connect as interactive
    init_connect: str = ""  # run for every client without SUPER / CONNECTION_ADMIN at login

    @property
    def is_mariadb(self) -> bool:
        return "mariadb" in self.version.lower()


@dataclass(frozen=True)
class MysqlStatus:
    """SHOW GLOBAL STATUS values; the counters count since the server started."""

    uptime: float  # seconds: the clock of churn
    threads_connected: int
    threads_running: int
    max_used_connections: int
    aborted_clients: int
    aborted_connects: int
    connections: int  # connection attempts, successful or not


class ProcessGroup(NamedTuple):
    """Client threads of the process list with the same state, user, database and client host."""

    state: str  # idle, idle_in_transaction, active, or the thread's command in lower case
    user: str
    db: str
    client_host: str  # HOST without the port; "localhost" for a socket
    count: int  # type: ignore[assignment]  # the field, not tuple.count
    leaked: int = 0  # idle (not in a transaction) for longer than the leak threshold
    max_idle: float = 0.0  # seconds: the longest idle (Sleep) thread of the group
    max_transaction_age: float = 0.0  # seconds: the oldest open InnoDB transaction of the group
    provider: bool = False  # a managed service's own user (provider_sessions): its client_host reads PROVIDER_APP


@dataclass(frozen=True)
class MysqlSnapshot:
    variables: MysqlVariables
    status: MysqlStatus
    groups: tuple[ProcessGroup, ...]  # client threads, the check's own left out
    new_connection: bool
    sees_all_threads: bool = True  # False without the PROCESS privilege: only the check's own user is listed
    quiet: tuple[Quiet, ...] = ()  # users whose idle threads are kept, not leaked (quiet.py)
