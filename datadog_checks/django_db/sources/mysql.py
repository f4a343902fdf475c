"""MySQL and MariaDB source: one persistent PyMySQL connection, one snapshot of plain data per run.

PyMySQL is imported when the source is made, that is only when a `mysql` section is configured.
Every step is bounded on the client side: ``connect_timeout`` for the TCP connection,
``query_timeout`` as PyMySQL's read and write timeouts for the handshake and every statement.
A connection the server closed since the previous run (``wait_timeout``, a restart) is found
broken on its first statement, opened again and the snapshot retried once.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from ..connection import APPLICATION_NAME, ClientTimeout, Source
from ..quiet import LastUse, youngest
from ..records import PROVIDER_APP, Failure, MysqlSnapshot, MysqlStatus, MysqlVariables, ProcessGroup, Quiet
from ..settings import Endpoint

VARIABLES_SQL = (
    "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('version', 'max_connections', 'wait_timeout', "
    "'interactive_timeout', 'init_connect', 'performance_schema')"
)
STATUS_SQL = (
    "SHOW GLOBAL STATUS WHERE Variable_name IN ('Uptime', 'Threads_connected', 'Threads_running', "
    "'Max_used_connections', 'Aborted_clients', 'Aborted_connects', 'Connections')"
)
# Without PROCESS, the process list shows the monitoring user's own threads only.
PRIVILEGES_SQL = "SELECT COUNT(*) FROM information_schema.USER_PRIVILEGES WHERE PRIVILEGE_TYPE IN ('PROCESS', 'SUPER')"

# HOST without its port, so clients of one host fold together.
CLIENT_HOST = """IF(p.HOST LIKE '%%:%%',
          LEFT(p.HOST, CHAR_LENGTH(p.HOST) - CHAR_LENGTH(SUBSTRING_INDEX(p.HOST, ':', -1)) - 1),
          COALESCE(p.HOST, ''))"""

# Client threads grouped in the server, by client host; background threads ('system user', Daemon) take no
# connection slot and are left out.
PROCESSLIST_SQL = """
SELECT p.COMMAND,
       t.trx_mysql_thread_id IS NOT NULL AS in_transaction,
       COALESCE(p.USER, '') AS user,
       COALESCE(p.DB, '') AS db,
       {client_host} AS client_host,
       COUNT(*) AS n,
       SUM(p.COMMAND = 'Sleep' AND t.trx_mysql_thread_id IS NULL AND p.TIME >= %(leak)s) AS leaked,
       MAX(IF(p.COMMAND = 'Sleep', p.TIME, 0)) AS max_idle,
       MIN(IF(p.COMMAND = 'Sleep' AND t.trx_mysql_thread_id IS NULL, p.TIME, 0)) AS min_idle,
       COALESCE(MAX(TIMESTAMPDIFF(SECOND, t.trx_started, NOW())), 0) AS max_transaction_age
FROM {processlist} p
LEFT JOIN information_schema.INNODB_TRX t ON t.trx_mysql_thread_id = p.ID
WHERE p.ID <> CONNECTION_ID() AND p.COMMAND <> 'Daemon' AND COALESCE(p.USER, '') <> 'system user'
GROUP BY 1, 2, 3, 4, 5
"""

# The idle threads of quiet users (see quiet.py) past the leak threshold, each with its idle time: read only when
# one of them has a thread idle longer than the threshold plus its quiet time, rare.
QUIET_IDLE_SQL = """
SELECT COALESCE(p.USER, ''), COALESCE(p.DB, ''), {client_host}, p.TIME
FROM {processlist} p
LEFT JOIN information_schema.INNODB_TRX t ON t.trx_mysql_thread_id = p.ID
WHERE p.ID <> CONNECTION_ID() AND p.COMMAND = 'Sleep' AND t.trx_mysql_thread_id IS NULL
      AND p.TIME >= %(leak)s AND p.USER IN %(users)s
"""

INFORMATION_SCHEMA = "information_schema.PROCESSLIST"
PERFORMANCE_SCHEMA = "performance_schema.processlist"  # MySQL 8.0.22 and later, without the global mutex

# Errors of a connection the server closed: gone away, lost during query, closed for inactivity (MySQL 8),
# killed (what MariaDB 10.5 tells its idle clients as it shuts down cleanly, where later ones close with 2013).
BROKEN = (2006, 2013, 4031, 1927)


class ProcessRow(NamedTuple):
    command: str
    in_transaction: int
    user: str
    db: str
    client_host: str
    n: int
    leaked: Any  # SUM() comes back as a Decimal
    max_idle: Any
    min_idle: Any
    max_transaction_age: Any


def processlist_table(version: str, performance_schema: str) -> str:
    """``performance_schema.processlist`` on MySQL 8.0.22 and later with performance_schema on."""
    if "mariadb" in version.lower() or performance_schema.upper() not in ("ON", "1"):
        return INFORMATION_SCHEMA
    numbers = []
    for part in version.split("-")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits or 0))
    return PERFORMANCE_SCHEMA if tuple(numbers) >= (8, 0, 22) else INFORMATION_SCHEMA


def state_of(command: str, in_transaction: bool) -> str:
    """The thread's state as a tag value: idle, idle_in_transaction, active, or its command."""
    if command == "Sleep":
        return "idle_in_transaction" if in_transaction else "idle"
    if command in ("Query", "Execute", "Fetch"):
        return "active"
    return command.strip().lower().replace(" ", "_") or "unknown"


class MysqlSource(Source):
    def __init__(self, endpoint: Endpoint, leak_idle_seconds: float, providers: frozenset[str] = frozenset()):
        """``providers``: a managed service's own users (provider_sessions), never an application's."""
        import pymysql  # only here: a PostgreSQL-only Agent never needs the driver

        self.pymysql = pymysql
        self.endpoint = endpoint
        self.leak_idle_seconds = leak_idle_seconds
        self.providers = providers
        self.conn: Any = None
        self.sees_all_threads = True
        self.last_use = LastUse()  # when each user last used a connection, as the runs saw it
        self.uptime: tuple[float, float] | None = None  # the server's Uptime at the previous read, and when

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: S110 - a broken connection may fail to close; it is dropped either way
                pass

    def connected(self) -> bool:
        return self.conn is not None

    def broken(self, error: BaseException) -> Failure | None:
        """The server closed the connection while it sat idle between runs (wait_timeout, a restart)."""
        if not isinstance(error, self.pymysql.err.Error) or not self._broken(error):
            return None
        code = error.args[0] if error.args and isinstance(error.args[0], int) else None
        return Failure(str(error), None, str(error), errno=code)

    def snapshot(self) -> MysqlSnapshot:
        """Read the server; a connection found broken is opened again at once, any other failure next run."""
        return self.read(self._snapshot)

    def _snapshot(self) -> MysqlSnapshot:
        new = self.conn is None
        if new:
            self._connect()
        try:
            return self._read(new)
        except self.pymysql.err.Error as e:
            raise self._timeout(e) from None

    def _connect(self) -> None:
        endpoint = self.endpoint
        try:
            self.conn = self.pymysql.connect(
                host=endpoint.host,
                port=endpoint.port,
                user=endpoint.username,
                password=self.password(),
                ssl=self._tls(),
                connect_timeout=endpoint.connect_timeout,
                read_timeout=endpoint.query_timeout,
                write_timeout=endpoint.query_timeout,
                autocommit=True,
                charset="utf8mb4",
                program_name=APPLICATION_NAME,
            )
            with self.conn.cursor() as cursor:
                cursor.execute(PRIVILEGES_SQL)
                self.sees_all_threads = bool(cursor.fetchone()[0])
        except self.pymysql.err.Error as e:
            self.close()
            raise self._timeout(e, "connect_timeout") from None

    def _tls(self) -> dict[str, Any] | None:
        """PyMySQL's TLS options: verified against ssl_ca where given; with a token always on, as RDS and Azure
        require for the cleartext password it is sent as (unverified without ssl_ca)."""
        ca = self.endpoint.ssl.get("ssl_ca")
        if ca:
            return {"ca": ca}
        return {"check_hostname": False} if self.endpoint.auth is not None else None

    def _group(self, r: ProcessRow) -> ProcessGroup:
        """A process-list group; the monitoring user's own threads (the check's other instances) and a managed
        service's are no leak, and the service's client host reads PROVIDER_APP."""
        user = str(r.user)
        provider = user in self.providers
        return ProcessGroup(
            state=state_of(str(r.command or ""), bool(r.in_transaction)),
            user=user,
            db=str(r.db),
            client_host=PROVIDER_APP if provider else str(r.client_host),
            count=int(r.n),
            leaked=int(r.leaked or 0) if user != self.endpoint.username and not provider else 0,
            max_idle=float(r.max_idle or 0),
            max_transaction_age=max(0.0, float(r.max_transaction_age or 0)),
            provider=provider,
        )

    def _broken(self, error: Exception) -> bool:
        if isinstance(error, self.pymysql.err.InterfaceError):
            return True  # PyMySQL found its socket closed
        code = error.args[0] if error.args else None
        return code in BROKEN and "timed out" not in str(error)

    def _timeout(self, error: Exception, what: str = "query_timeout") -> Exception:
        """A socket timeout as ClientTimeout, so it reads as one; any other error as it came."""
        if "timed out" in str(error):
            seconds = self.endpoint.connect_timeout if what == "connect_timeout" else self.endpoint.query_timeout
            if error.args and error.args[0] == 2013:
                what, seconds = "query_timeout", self.endpoint.query_timeout
            return ClientTimeout(what, seconds)
        return error

    def _read(self, new: bool) -> MysqlSnapshot:
        with self.conn.cursor() as cursor:
            cursor.execute(VARIABLES_SQL)
            variables = {str(name): str(value) for name, value in cursor.fetchall()}
            cursor.execute(STATUS_SQL)
            status = {str(name): str(value) for name, value in cursor.fetchall()}
            table = processlist_table(variables.get("version", ""), variables.get("performance_schema", "OFF"))
            cursor.execute(
                PROCESSLIST_SQL.format(processlist=table, client_host=CLIENT_HOST), {"leak": self.leak_idle_seconds}
            )
            rows = [ProcessRow(*row) for row in cursor.fetchall()]
            groups = tuple(self._group(r) for r in rows)
            groups, kept = self._quiet(cursor, table, rows, groups)
        uptime, now = float(status.get("Uptime", 0)), time.monotonic()
        # Whole seconds on the server's side: over 2 s short of what it would be had the server run on.
        if self.uptime is not None and uptime + 2 < self.uptime[0] + (now - self.uptime[1]):
            self.restarted = f"its Uptime went back to {uptime:.0f} s"
        self.uptime = (uptime, now)
        return MysqlSnapshot(
            variables=MysqlVariables(
                version=variables.get("version", ""),
                max_connections=int(variables.get("max_connections", 0)),
                wait_timeout=int(variables.get("wait_timeout", 28800)),
                interactive_timeout=int(variables.get("interactive_timeout", 28800)),
                init_connect=variables.get("init_connect", ""),
            ),
            status=MysqlStatus(
                uptime=float(status.get("Uptime", 0)),
                threads_connected=int(status.get("Threads_connected", 0)),
                threads_running=int(status.get("Threads_running", 0)),
                max_used_connections=int(status.get("Max_used_connections", 0)),
                aborted_clients=int(status.get("Aborted_clients", 0)),
                aborted_connects=int(status.get("Aborted_connects", 0)),
                connections=int(status.get("Connections", 0)),
            ),
            groups=groups,
            new_connection=new,
            sees_all_threads=self.sees_all_threads,
            quiet=kept,
        )

    def _quiet(
        self, cursor: Any, table: str, rows: list[ProcessRow], groups: tuple[ProcessGroup, ...]
    ) -> tuple[tuple[ProcessGroup, ...], tuple[Quiet, ...]]:
        """The leaks of quiet users taken back where their threads went idle only as the user went quiet (quiet.py),
        with the users left without a leak."""
        # any state but idle (a query, a transaction) is the user at work
        ages = youngest(
            (g.user, float(r.min_idle or 0) if g.state == "idle" else 0.0)
            for g, r in zip(groups, rows, strict=True)
            if not g.provider
        )
        limit = self.leak_idle_seconds
        quiet = self.last_use.quiet(ages, lambda _: limit, time.monotonic())
        if not quiet or not any(g.leaked for g in groups):
            return groups, ()
        recount = {g.user for g in groups if g.leaked and g.user in quiet and g.max_idle > limit + quiet[g.user]}
        found: dict[tuple[str, str, str], int] = {}
        if recount:  # some went idle before the user went quiet: count those exactly
            cursor.execute(
                QUIET_IDLE_SQL.format(processlist=table, client_host=CLIENT_HOST),
                {"leak": limit, "users": tuple(sorted(recount))},
            )
            for user, db, host, idle in cursor.fetchall():
                if float(idle) > limit + quiet[str(user)]:
                    key = (str(user), str(db), str(host))
                    found[key] = found.get(key, 0) + 1
        changed = tuple(
            g._replace(leaked=found.get((g.user, g.db, g.client_host), 0)) if g.leaked and g.user in quiet else g
            for g in groups
        )
        leaking = {g.user for g in changed if g.leaked}
        held: dict[str, int] = {}
        for g in groups:
            held[g.user] = held.get(g.user, 0) + g.count
        kept = tuple(
            Quiet(user, quiet[user], held[user])
            for user in sorted({g.user for g in groups if g.leaked} - leaking)
            if user in quiet
        )
        return changed, kept
