"""Known connection error signatures: one table.

An error is named by what it is before what it says: its MySQL error number, the check's own
timeout (by its type or flag), its SQLSTATE (the text only picks among rows that share one),
the SQLSTATE's class; and only then by the server's primary message (or a log line's text).
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

from ..records import Failure
from .model import Status


class Signature(NamedTuple):
    name: str
    status: Status
    sqlstates: tuple[str, ...]
    pattern: re.Pattern[str] | None
    advice: str
    errnos: tuple[int, ...] = ()  # MySQL and MariaDB client or server error numbers


def _re(text: str) -> re.Pattern[str]:
    return re.compile(text, re.IGNORECASE)


# A row's SQLSTATEs name it by themselves; where several rows share one (53300, PgBouncer's 08P01),
# the text picks among them. Order matters for text: the first row whose text matches wins, and a
# row with SQLSTATEs also matches an error without SQLSTATE (a log line, a connection refused at
# login, for which libpq hands over no SQLSTATE) on its text alone.
# MySQL rows come first: their texts carry the error number, "(1040, 'Too many connections')",
# or words PostgreSQL never uses, so a PostgreSQL text never matches them.
TABLE: tuple[Signature, ...] = (
    Signature(
        "mysql_too_many_connections", Status.CRITICAL, (),
        _re(r"\b1040\b[^\n]{0,12}too many connections|ER_CON_COUNT_ERROR|\[(?:ERROR|Warning)\].*too many connections"),
        "MySQL reached max_connections and refuses new clients (1040). Find the user or host holding "
        "connections (leaks, CONN_MAX_AGE=None with many threads), close them, or raise max_connections.",
        (1040,),
    ),
    Signature(
        "mysql_server_gone", Status.WARNING, (),
        _re(r"server has gone away|lost connection to (?:mysql |mariadb )?server (?:during query|at )"
            r"|\b1927\b[^\n]{0,6}connection was killed"),
        "The MySQL server closed the connection (2006, 2013; 1927 from a MariaDB 10.5 shutting down): most "
        "often a persistent connection idle past wait_timeout. Keep CONN_MAX_AGE below wait_timeout and set "
        "CONN_HEALTH_CHECKS=True; else look for restarts or max_allowed_packet.",
        (2006, 2013, 4031, 1927),
    ),
    Signature(
        "mysql_access_denied", Status.CRITICAL, (),
        _re(r"access denied for user"),
        "MySQL refused the credentials (1045): check USER and PASSWORD, and the user's host part "
        "('app'@'%' or 'app'@'10.0.0.%').",
        (1045,),
    ),
    Signature(
        "mysql_unknown_database", Status.CRITICAL, (),
        _re(r"unknown database '"),
        "The database does not exist on the MySQL server (1049): check NAME, or create it.",
        (1049,),
    ),
    Signature(
        "mysql_cannot_connect", Status.CRITICAL, (),
        _re(r"can't connect to (?:mysql |mariadb )?server|can't connect to local (?:mysql |mariadb )?server"),
        "Nothing accepts connections at that address (2003): check that MySQL runs and listens on that "
        "host and port (bind-address, skip-networking, firewall).",
        (2003, 2002),
    ),
    Signature(
        "login_token_unavailable", Status.CRITICAL, (),
        _re(r"the (?:aws|azure) login token could not be made"),
        "The Agent's host could not make the token the check logs in with (aws or azure managed_authentication). "
        "AWS: the host's credentials (instance profile, IRSA, environment) must reach STS and allow rds-db:connect "
        "(and sts:AssumeRole on role_arn); Azure: the managed identity must be assigned to the host, client_id "
        "naming it.",
    ),
    Signature(
        "reserved_slots", Status.CRITICAL, ("53300",),
        _re(r"remaining connection slots are reserved"),
        "Only reserved slots are left on PostgreSQL: ordinary roles are refused. "
        "Close idle or leaked connections, lower CONN_MAX_AGE, or pool through PgBouncer in transaction mode.",
    ),
    Signature(
        "too_many_clients", Status.CRITICAL, ("53300",),
        _re(r"too many clients already|too many connections"),
        "PostgreSQL reached max_connections and refuses new clients. "
        "Close idle or leaked connections, pool through PgBouncer, or raise max_connections.",
    ),
    Signature(
        "max_client_conn", Status.CRITICAL, ("08P01",),
        _re(r"no more connections allowed \(max_client_conn\)"),
        "PgBouncer reached max_client_conn and refuses new clients. "
        "Find the application holding client connections (leaks, CONN_MAX_AGE=None) or raise max_client_conn.",
    ),
    Signature(
        "query_wait_timeout", Status.CRITICAL, ("08P01",),
        _re(r"query_wait_timeout"),
        "Clients waited at PgBouncer longer than query_wait_timeout for a server connection: "
        "the pool is saturated. Shorten transactions, use transaction pool mode, or raise the pool size.",
    ),
    Signature(
        "server_login_retry", Status.CRITICAL, ("08P01",),
        _re(r"server_login_retry|pgbouncer cannot connect to server"),
        "PgBouncer cannot log in to PostgreSQL: check that PostgreSQL is up, has free slots, "
        "and accepts PgBouncer's credentials.",
    ),
    Signature(
        "console_not_allowed", Status.CRITICAL, ("08P01",),
        _re(r"(?:^|FATAL:\s+|ERROR:\s+|(?:pooler|login) error: |failed: )not allowed\s*$"),
        "PgBouncer accepted the password but refused the user on its admin console (\"not allowed\"): "
        "add the user to stats_users (or admin_users) in pgbouncer.ini and reload PgBouncer "
        "(RELOAD on the console, or SIGHUP).",
    ),
    Signature(
        "auth_failed", Status.CRITICAL, ("28P01", "28000"),
        _re(r"password authentication failed|authentication failed|no password supplied|"
            r"no pg_hba\.conf entry|fe_sendauth"),
        "The server refused the credentials: check username and password, pg_hba.conf, "
        "and PgBouncer's auth_file.",
    ),
    Signature(
        "database_missing", Status.CRITICAL, ("3D000", "08P01"),
        _re(r"database \"[^\"]*\" does not exist|no such database"),
        "The database does not exist: check dbname, or PgBouncer's [databases] section.",
    ),
    Signature(
        "statement_timeout", Status.WARNING, ("57014",),
        _re(r"canceling statement due to statement timeout"),
        "A statement ran past statement_timeout and was cancelled: look for slow queries or lock waits.",
    ),
    Signature(
        "admin_shutdown", Status.WARNING, ("57P01",),
        _re(r"terminating connection due to administrator command"),
        "The server terminated connections (pg_terminate_backend, a restart or a failover); "
        "clients must reconnect, with CONN_HEALTH_CHECKS on.",
    ),
    Signature(
        "memory_quota", Status.CRITICAL, ("53200",),
        _re(r"memory quota exceeded|out of memory"),
        "The server ran out of memory for connections: each costs about 10 MB. "
        "Lower the number of connections or give the server more memory.",
    ),
    Signature(
        "server_closed", Status.CRITICAL, ("08006", "08003"),
        _re(r"server closed the connection unexpectedly|connection to server .* lost|"
            r"consuming input failed|the connection is closed"),
        "The server side went away mid-session: look for restarts, crashes, or a proxy or "
        "firewall closing idle connections (align CONN_MAX_AGE with its timeouts).",
    ),
    Signature(
        "pool_timeout", Status.CRITICAL, (),
        _re(r"couldn't get a connection after [\d.]+ sec|\bPoolTimeout\b"),
        "Requests got no connection from the application's own pool (psycopg_pool, Django's "
        "OPTIONS['pool']) within its timeout: every connection of the pool was busy. Give the pool "
        "max_size at least the threads that query at once in each process (gunicorn --threads), within "
        "the server's free slots for all processes (workers x max_size), or shorten what holds "
        "connections; OPTIONS['pool']['timeout'] is how long a request waits before it fails.",
    ),
    Signature(
        "queuepool_limit", Status.CRITICAL, (),
        _re(r"QueuePool limit of size \d+ overflow -?\d+ reached"),
        "Requests got no connection from django-db-connection-pool's QueuePool (SQLAlchemy) within its "
        "TIMEOUT: POOL_SIZE + MAX_OVERFLOW connections were all busy. Give each process POOL_SIZE + "
        "MAX_OVERFLOW at least its threads that query at once (gunicorn --threads), within the server's "
        "free slots for all processes (workers x (POOL_SIZE + MAX_OVERFLOW)), or shorten what holds "
        "connections; POOL_OPTIONS' TIMEOUT is how long a request waits before it fails.",
    ),
    # Session state that transaction pooling loses: the error names the cursor or statement, after a colon
    # (the log's "ERROR:  ", the exception's class) or at the start of the server's message. A statement log
    # line that quotes a cursor's name ("statement: FETCH ... FROM \"_django_curs_1\"") is no error.
    Signature(
        "server_side_cursor_lost", Status.WARNING, ("34000", "42P03"),
        _re(r"(?:^|:\s+)(?:cursor|portal) \"[^\"\n]*\" (?:does not exist|already exists)"),
        "A server-side cursor was read on another server connection than the one that declared it "
        "(Django's QuerySet.iterator() declares one): a pooler in transaction mode hands each transaction "
        "to any server connection. Set DISABLE_SERVER_SIDE_CURSORS = True in the DATABASES entry that "
        "goes through it.",
    ),
    Signature(
        "prepared_statement_lost", Status.WARNING, ("26000", "42P05", "08P01"),
        _re(r"(?:^|:\s+)prepared statement \"[^\"\n]*\" (?:does not exist|already exists)|"
            r"bind message supplies \d+ parameters, but prepared statement \"[^\"\n]*\" requires \d+"),
        "A prepared statement was run on another server connection than the one that prepared it: a pooler "
        "in transaction mode hands each transaction to any server connection. Remove server_side_binding "
        "and prepare_threshold from Django's OPTIONS, or pool with PgBouncer 1.21 or later and "
        "max_prepared_statements above 0.",
    ),
    Signature(
        "ssl_unavailable", Status.CRITICAL, (),
        _re(r"server does not support SSL, but SSL was required"),
        "sslmode asks for SSL (require, verify-ca or verify-full) but the server does not offer it: "
        "turn ssl on at PostgreSQL (or client_tls_sslmode at PgBouncer), or lower sslmode to prefer "
        "where the network is trusted.",
    ),
    Signature(
        "connect_timeout", Status.CRITICAL, (),
        _re(r"timeout expired|timed out"),
        "The server did not answer in time (connect_timeout or query_timeout): "
        "check that it is up, not hung or overloaded, and reachable.",
    ),
    Signature(
        "connection_refused", Status.CRITICAL, ("08001",),
        _re(r"connection refused|could not connect to server|no such file or directory|"
            r"could not translate host name|name or service not known"),
        "Nothing accepts connections at that address: check that the server runs and listens "
        "on that host and port.",
    ),
    # Named by the SQLSTATE's class alone, when no row above names the error (see FALLBACK).
    Signature(
        "connection_failed", Status.CRITICAL, (), None,
        "The connection failed or broke (SQLSTATE class 08) for a reason without a signature of its own: "
        "read the error's text and the log of the server or PgBouncer.",
    ),
    Signature(
        "insufficient_resources", Status.CRITICAL, (), None,
        "The server lacks a resource (SQLSTATE class 53: disk full, out of memory, a configured limit): "
        "read the server's log.",
    ),
)  # fmt: skip

# When no row names an error with a SQLSTATE: the code's own choice, else its class's, longest first.
FALLBACK: tuple[tuple[str, str], ...] = (
    ("53300", "too_many_clients"),
    ("57P", "admin_shutdown"),
    ("08", "connection_failed"),
    ("28", "auth_failed"),
    ("53", "insufficient_resources"),
)

UNKNOWN = Signature(
    "unknown", Status.WARNING, (), None, "An error without a known signature: read its text and the server's log."
)
BY_NAME = {s.name: s for s in (*TABLE, UNKNOWN)}


def classify(text: str, sqlstate: str | None = None, errno: int | None = None, timeout: bool = False) -> Signature:
    """The signature of an error: its MySQL error number, the check's own timeout, its SQLSTATE (the
    text picking among rows that share it), its SQLSTATE's class, and only then its text."""
    if errno:
        for signature in TABLE:
            if errno in signature.errnos:
                return signature
    if timeout:
        return BY_NAME["connect_timeout"]
    if sqlstate:
        with_state = [s for s in TABLE if sqlstate in s.sqlstates]
        if len(with_state) == 1:
            return with_state[0]
        for signature in with_state:
            if signature.pattern is not None and signature.pattern.search(text):
                return signature
        for prefix, name in FALLBACK:
            if sqlstate.startswith(prefix):
                return BY_NAME[name]
    return match_text(text) or UNKNOWN


def classify_failure(failure: Failure, errno: int | None = None) -> Signature:
    """The signature of a failure as a source describes it: by its flag and SQLSTATE first, then by the
    server's primary message (the client library's own words where the server said nothing)."""
    errno = failure.errno if errno is None else errno
    return classify(failure.message or failure.text, failure.sqlstate, errno, failure.timeout)


def match_text(text: str) -> Signature | None:
    """The first row whose text matches, or None: a database driver's or server's own words."""
    for signature in TABLE:
        if signature.pattern is not None and signature.pattern.search(text):
            return signature
    return None


# Rows whose words other software uses too ("connection refused" from a cache or an HTTP client, "timed out",
# "out of memory"): in a log line they count only beside a sign that a database said them (its driver's name or
# exception, a server's severity); the check's own errors come from its drivers and need none.
GENERIC = frozenset({"connection_refused", "connect_timeout", "memory_quota", "server_closed"})
DATABASE_WORDS = _re(
    r"psycopg|libpq|postgres|pgbouncer|pymysql|mysqlclient|MySQLdb|mysql|mariadb|django\.db|OperationalError|"
    r"InterfaceError|DatabaseError|\b(?:FATAL|PANIC|ERROR|LOG|WARNING):\s|pooler error|connection to server|"
    r"could not connect to server|could not translate host name|server closed the connection unexpectedly|"
    r"consuming input failed|terminated abnormally"
)
# A process manager's own lines about its workers (gunicorn's, uWSGI's, Celery's pool, the kernel's OOM killer):
# no database said them. gunicorn's line heads a traceback at times (Error handling request): the traceback that
# follows is the application's and is read.
PROCESS_MANAGER = re.compile(
    r"^\[[^\]]+\] \[\d+\] \[(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\] "
    r"|DAMN ! worker \d+|\*\*\* HARAKIRI|worker \d+ \(pid: \d+\) (?:died|killed)"
    r"|Process '[^']*' pid:\d+ exited with|WorkerLostError|Worker exited prematurely"
    r"|Out of memory: Kill|oom-kill|invoked oom-killer"
)


def match_log_line(line: str) -> Signature | None:
    """The signature a log line names, or None: never a process manager's own line, and a row whose words other
    software uses only beside a database's sign."""
    if PROCESS_MANAGER.search(line):
        return None
    signature = match_text(line)
    if signature is not None and signature.name in GENERIC and not DATABASE_WORDS.search(line):
        return None
    return signature


# PgBouncer logs each refused client twice: "C-0x..: db/user@addr closing because: <reason>"
# and "C-0x..: db/user@addr pooler error: <reason>". Only the second one is counted.
PGBOUNCER_TWIN = re.compile(r"\bC-0x[0-9a-f]+: \S+ closing because: ")


# A Python traceback: its head, the lines that chain one exception to the next, and a frame's lines
# (indented: "  File ...", the source line, carets). Frame lines quote code, which may hold the very
# words of an error (psycopg_pool's `raise PoolTimeout(f"couldn't get a connection after ...")`): they
# are never matched.
TRACEBACK = "Traceback (most recent call last):"
CHAIN_MARKERS = (
    "The above exception was the direct cause of the following exception",
    "During handling of the above exception, another exception occurred",
)


# What a failure names, so that lines telling the same one count once (LogRecords).
CURSOR_NAMED = re.compile(r'(?:cursor|portal) "([^"\n]+)"')
PREPARED_NAMED = re.compile(r'prepared statement "([^"\n]+)"')
CLOSE_STATEMENT = re.compile(r'STATEMENT:\s+CLOSE\s+"?([^"\s;]+)', re.IGNORECASE)
PROCESS_ID = re.compile(r"\[(\d+)\]")  # PostgreSQL's %p, as its default log_line_prefix has it: '%m [%p] '
RECENT_FAILURES = 256


class LogRecords:
    """Counts each log record once: one line, or a line with what continues it.

    A record goes on over indented lines (a message's second line, a traceback's frames), a Python
    traceback and its chained parts ("The above exception was the direct cause ...", "During handling
    of the above exception ..."), which show one failure two or three times: the driver's exception and
    Django's re-raise of it. A record counts the first signature found in it, once. Keep one per file:
    a record cut between two runs goes on in the next.

    ``app_of`` reads a line's application name (PostgreSQL's ``%a``, see ``log_prefix``): ``apps`` then
    holds, for the last ``feed``, the records counted by (signature, application) where the line names one.
    """

    def __init__(self, app_of: Callable[[str], str | None] | None = None) -> None:
        self.state = "start"  # start: no record yet (lines that continue one before are skipped); line: after an
        # ordinary line; frames: inside a traceback; raised: after the traceback's exception
        self.counted = True  # the current record's signature was counted, or there is no record yet
        self.app_of = app_of
        self.apps: Counter[tuple[str, str]] = Counter()
        # Lines that tell one failure twice: a cursor's error waits for PostgreSQL's next line (its statement);
        # the cursors whose failure was counted, so that their CLOSE's is not; the last prepared statement's.
        self.pending: tuple[str, str] | None = None
        self.cursors: deque[str] = deque(maxlen=RECENT_FAILURES)
        self.last_prepared: tuple[str, str] | None = None

    def feed(self, lines: Iterable[str]) -> Counter[str]:
        found: Counter[str] = Counter()
        self.apps = Counter()
        for line in lines:
            if self.pending is not None:
                self._settle(line, found)
            if PGBOUNCER_TWIN.search(line):
                continue
            if not self._continues(line):
                self.counted = False  # a new record
            if self.counted or (self.state == "frames" and line[:1].isspace()):
                continue
            signature = match_log_line(line)
            if signature is None:
                continue
            self.counted = True
            if signature.name == "server_side_cursor_lost" and (cursor := CURSOR_NAMED.search(line)):
                self.pending = (line, cursor.group(1))  # told by the statement on the next line
            elif not self._again(signature.name, line):
                self._count(signature.name, line, found)
        if self.pending is not None:  # no statement line follows in this run's lines
            self._count("server_side_cursor_lost", self.pending[0], found)
            self.cursors.append(self.pending[1])
            self.pending = None
        return found

    def _count(self, name: str, line: str, found: Counter[str]) -> None:
        found[name] += 1
        app = self.app_of(line) if self.app_of is not None else None
        if app is not None:
            self.apps[name, app] += 1

    def _settle(self, line: str, found: Counter[str]) -> None:
        """A cursor's error, told by PostgreSQL's next line: the CLOSE of a cursor whose FETCH failed already is
        the same failure (PostgreSQL logs the statement of an error on the line after it, log_min_error_statement);
        any other counts."""
        assert self.pending is not None
        error, cursor = self.pending
        self.pending = None
        closing = CLOSE_STATEMENT.search(line)
        if closing is not None and closing.group(1) == cursor and cursor in self.cursors:
            self.cursors.remove(cursor)
            return
        self._count("server_side_cursor_lost", error, found)
        self.cursors.append(cursor)

    def _again(self, name: str, line: str) -> bool:
        """Whether the line tells the failure of the line before again: the same prepared statement in the same
        session (the process id of PostgreSQL's prefix)."""
        if name != "prepared_statement_lost":
            return False
        named, pid = PREPARED_NAMED.search(line), PROCESS_ID.search(line)
        if named is None or pid is None:
            return False
        key = (named.group(1), pid.group(1))
        again, self.last_prepared = key == self.last_prepared, key
        return again

    def _continues(self, line: str) -> bool:
        """Whether ``line`` belongs to the current record; moves through a traceback's parts."""
        text = line.strip()
        state = self.state
        if text.startswith(TRACEBACK):
            self.state = "frames"
            # a message's own traceback (Django's "Internal Server Error: /path"), a chained one, or a new record
            return state in ("line", "frames")
        if any(text.startswith(marker) for marker in CHAIN_MARKERS):
            self.state = "frames"  # the next traceback of the chain follows
            return True
        if not text or line[:1].isspace():
            return True
        if state == "frames":
            self.state = "raised"  # the exception's own line, unindented, ends the frames
            return True
        self.state = "line"
        return False


def count_log_lines(lines: Iterable[str]) -> Counter[str]:
    """Signature names found in log lines, one per record (see LogRecords)."""
    return LogRecords().feed(lines)


def mysql_errno(error: BaseException) -> int | None:
    """The error number of a PyMySQL error (its first argument), told apart without importing the driver."""
    if type(error).__module__.startswith("pymysql") and error.args and isinstance(error.args[0], int):
        return error.args[0]
    return None


def is_timeout(error: BaseException) -> bool:
    """The check's own deadline (``connection.ClientTimeout``) or psycopg's connect timeout, by type."""
    return any(
        getattr(cls, "timeout", False) is True
        or (cls.__name__ == "ConnectionTimeout" and cls.__module__.startswith("psycopg"))
        for cls in type(error).__mro__
    )


def classify_error(error: BaseException) -> Signature:
    """An exception by its type and SQLSTATE, then its primary message: the driver's own where it has one."""
    diag = getattr(error, "diag", None)
    message = getattr(diag, "message_primary", None) or str(error)
    return classify(message, getattr(error, "sqlstate", None), mysql_errno(error), is_timeout(error))
