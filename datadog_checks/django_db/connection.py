"""Opening a monitoring connection, and bounding every query on the client side.

libpq has no read timeout: a server that accepts the TCP connection and then hangs
(a stopped PgBouncer, a frozen host) would block the Agent's worker for ever. Each
query therefore runs under a deadline kept by one watchdog thread; when a deadline
passes, the watchdog shuts the socket down, the blocked read returns at once, and the
caller gets ``ClientTimeout``. The connection is then broken and is opened again on
the next run.

The watchdog serves every instance of the check in the Agent's process, so nothing one
instance asks of it may stop it: a deadline is clamped to ``MAX_DEADLINE``, the thread
survives any error of its own, and a thread found dead is started again.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from .managed import Tokens
from .records import Failure
from .settings import APPLICATION_NAME as APPLICATION_NAME
from .settings import Endpoint

MAX_DEADLINE = 24 * 3600.0  # seconds; the configuration allows an hour at most
_WAIT_SLICE = 60.0  # the longest single wait of the watchdog thread

log = logging.getLogger(__name__)

T = TypeVar("T")


class ClientTimeout(Exception):
    """The server sent no answer within the client-side bound."""

    timeout = True  # what the signatures recognise it by, rather than its words

    def __init__(self, what: str, seconds: float):
        super().__init__(f"timeout expired: no answer within {what} ({seconds:g} s)")


class _Watchdog:
    """One daemon thread that shuts down the sockets of queries past their deadline.

    Arming a deadline wakes the thread only when it falls before the thread's next look at the
    heap: a run's deadline is nearly always later than the previous one's, still in the heap, so
    a run costs a push on the heap and a pop from a dict, not a thread switch. A deadline
    disarmed stays in the heap until the thread next looks.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, int] = {}  # token: the socket's file descriptor
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._wakes_at = 0.0  # monotonic time the waiting thread looks at the heap again by itself

    def arm(self, fileno: int, seconds: float) -> int:
        due = time.monotonic() + _clamp(seconds)
        with self._lock:  # the condition's own lock, taken without its Python-level wrapper
            token = next(self._ids)
            self._armed[token] = fileno
            heapq.heappush(self._heap, (due, token))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="django-db-watchdog", daemon=True)
                self._thread.start()
            elif due < self._wakes_at:
                self._cond.notify()
        return token

    def disarm(self, token: int) -> bool:
        """Whether the deadline had passed (the socket is shut down, or about to be)."""
        return self._armed.pop(token, None) is None  # atomic: the thread takes the token or we do

    def _run(self) -> None:
        while True:
            try:
                self._step()
            except Exception:
                log.exception("the query watchdog met an error; it goes on")
                time.sleep(0.01)

    def _step(self) -> None:
        with self._cond:
            while self._heap and self._heap[0][1] not in self._armed:
                heapq.heappop(self._heap)
            now = time.monotonic()
            if not self._heap:
                self._wait(now, _WAIT_SLICE)
                return
            due, token = self._heap[0]
            if due > now:
                self._wait(now, min(due - now, _WAIT_SLICE))
                return
            heapq.heappop(self._heap)
            fileno = self._armed.pop(token, None)
        if fileno is not None:
            _shutdown(fileno)

    def _wait(self, now: float, seconds: float) -> None:
        self._wakes_at = now + seconds
        try:
            self._cond.wait(seconds)
        finally:
            self._wakes_at = 0.0  # awake: it looks at the heap before it waits again


def _clamp(seconds: float) -> float:
    """A deadline the heap can order and the thread can wait for: finite, from 0 to MAX_DEADLINE."""
    try:
        value = float(seconds)
    except (TypeError, ValueError, OverflowError):
        return MAX_DEADLINE
    if value != value:  # NaN
        return MAX_DEADLINE
    return min(max(value, 0.0), MAX_DEADLINE)


def _shutdown(fileno: int) -> None:
    try:
        sock = socket.socket(fileno=os.dup(fileno))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


_WATCHDOG = _Watchdog()


class _Deadline:
    __slots__ = ("_fileno", "_seconds", "_token", "_what")

    def __init__(self, conn: psycopg.Connection, seconds: float, what: str):
        self._fileno, self._seconds, self._what = conn.fileno(), seconds, what
        self._token = -1

    def __enter__(self) -> None:
        self._token = _WATCHDOG.arm(self._fileno, self._seconds)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        fired = _WATCHDOG.disarm(self._token)
        if fired and (kind is None or issubclass(kind, Exception)):
            raise ClientTimeout(self._what, self._seconds) from None


def deadline(conn: psycopg.Connection, seconds: float, what: str = "query_timeout") -> _Deadline:
    """Run the block with the connection's socket shut down after ``seconds``."""
    return _Deadline(conn, seconds, what)


def connect(endpoint: Endpoint, **kwargs: Any) -> psycopg.Connection:
    """Open an autocommit connection; libpq counts connect_timeout in whole seconds (2 at the least)."""
    params: dict[str, Any] = {
        "host": endpoint.host,
        "port": endpoint.port,
        "user": endpoint.username,
        "password": endpoint.password or None,
        "dbname": endpoint.dbname,
        "connect_timeout": max(2, math.ceil(endpoint.connect_timeout)),
        "application_name": APPLICATION_NAME,
        **endpoint.ssl,
        **kwargs,
    }
    return psycopg.connect(autocommit=True, **params)


class TokenUnavailable(Exception):
    """Managed authentication could not make the token of a login (managed.py)."""


class Source:
    """What every server source is: one connection to its server, opened when needed, closed on any
    failure; ``snapshot()`` reads the server once; ``lost`` says what broke the connection kept from
    the previous run, when the last snapshot found it broken; ``close()`` lets it go.

    A connection kept from the previous run may have been closed by the server since (a restart,
    pg_terminate_backend, a PgBouncer restart, MySQL's wait_timeout): its first statement then fails at
    once, although the server may well be back. ``read`` tells that apart from a server that is down.
    """

    endpoint: Endpoint
    lost: Failure | None = None  # what broke the kept connection during the last read
    restarted: str = ""  # how a read found the server restarted since the one before; the check takes it
    _tokens: Tokens | None = None

    def password(self) -> str:
        """The password of a new connection: the configured one, or a token made for it (managed.py)."""
        endpoint, auth = self.endpoint, self.endpoint.auth
        if auth is None:
            return endpoint.password
        if self._tokens is None:
            self._tokens = Tokens(auth, endpoint.host, endpoint.port, endpoint.username, endpoint.connect_timeout)
        try:
            return self._tokens.password()
        except Exception as e:  # botocore's, azure-identity's: said as what failed, with their words
            raise TokenUnavailable(f"the {auth.kind} login token could not be made: {e}") from None

    def snapshot(self) -> Any:
        """The server's state as a record (PgSnapshot, PgbSnapshot, MysqlSnapshot)."""
        raise NotImplementedError

    def connected(self) -> bool:
        raise NotImplementedError

    def broken(self, error: BaseException) -> Failure | None:
        """What closed the kept connection, when ``error`` says the server closed it; else None."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def read(self, attempt: Callable[[], T]) -> T:
        """``attempt()``, and once more on a new connection when the kept one was found broken.

        Only a connection error that left a kept connection broken is retried: never a timeout of
        our own (a hung server) nor a failure of a new connection, so the retry costs no wait
        beyond the bounds of one new connection. Whatever fails closes the connection and is raised.
        """
        self.lost = None
        kept = self.connected()
        try:
            return attempt()
        except BaseException as e:
            lost = self.broken(e) if kept else None
            self.close()
            if lost is None:
                raise
            self.lost = lost
        try:
            return attempt()
        except BaseException:
            self.close()
            raise


class Reconnecting(Source):
    """A source over one psycopg connection."""

    conn: psycopg.Connection[Any] | None = None
    _farewell: Failure | None = None  # the server's last word before it closed the connection

    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def broken(self, error: BaseException) -> Failure | None:
        if isinstance(error, psycopg.OperationalError) and self.conn is not None and self.conn.broken:
            return self._farewell or describe(error)
        return None

    def open(self, **kwargs: Any) -> psycopg.Connection[Any]:
        self.conn = conn = connect(self.endpoint, password=self.password() or None, **kwargs)
        self._farewell = None
        conn.add_notice_handler(self._on_notice)
        return conn

    def _on_notice(self, diag: psycopg.errors.Diagnostic) -> None:
        # A server closing a connection says why (57P01 and its kin); libpq hands that over as a
        # notice when no statement's result was awaited, as in a pipeline.
        sqlstate = diag.sqlstate or ""
        if sqlstate.startswith("57P") or diag.severity_nonlocalized in ("FATAL", "PANIC"):
            primary = diag.message_primary or ""
            self._farewell = Failure(primary, sqlstate or None, primary)

    def close(self) -> None:
        close_quietly(self.conn)
        self.conn = None


# libpq's words before the reason a connection failed, and the server's own message within them.
_ADDRESS = re.compile(r'^(?:connection failed: )?connection to server (?:at|on socket) "[^"]*".*? failed: ')
_SERVER_MESSAGE = re.compile(r"\b(?:FATAL|ERROR|PANIC):\s+(.+)")


def describe(error: BaseException) -> Failure:
    """An error as plain values: the driver's SQLSTATE and the server's message, our own timeout by its type."""
    text = str(error)
    if isinstance(error, (ClientTimeout, psycopg.errors.ConnectionTimeout)):
        return Failure(text, None, text, timeout=True)
    if not isinstance(error, psycopg.Error):
        return Failure(text, None, text)
    message = error.diag.message_primary
    if not message:
        found = _SERVER_MESSAGE.search(text)
        message = found.group(1) if found else _ADDRESS.sub("", text)
    return Failure(text, error.sqlstate, message.strip())


def close_quietly(conn: psycopg.Connection | None) -> None:
    if conn is None:
        return
    try:
        conn.close()
    except Exception:  # noqa: S110 - a broken connection may fail to close; it is dropped either way
        pass
