"""PgBouncer source: the admin console over one persistent connection, normalised into records.

Every SHOW result is read by column name, resolved once per result: a column a version lacks
is None, an unknown one is ignored, a renamed one (``reserve_pool`` to ``reserve_pool_size``)
feeds the same field. The admin database's own rows are left out here, once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from itertools import chain
from operator import itemgetter
from typing import Any, Generic, LiteralString, TypeVar

import psycopg
from psycopg.types.numeric import FloatLoader

from ..connection import Reconnecting, deadline
from ..records import ADMIN_DB, PgbConfig, PgbDatabase, PgbNames, PgbPool, PgbServer, PgbSnapshot, PgbStats
from ..settings import Endpoint
from .pgbouncer_clients import parse_clients

# Read every run: what changes from one run to the next.
PER_RUN: tuple[LiteralString, ...] = ("POOLS", "STATS", "CLIENTS")
ON_CONNECT: tuple[LiteralString, ...] = ("CONFIG", "VERSION")
# What changes on a RELOAD, a PAUSE or a new database only: read on connecting, then again every
# SETTINGS_SECONDS, or at once when a pool names a database not known when DATABASES was last read.
SETTINGS_SECONDS = 300.0
# The `extra_metrics` groups that read a statement every run.
EVERY_RUN: dict[str, LiteralString] = {"pgbouncer_databases": "DATABASES", "pgbouncer_lists": "LISTS"}

POOL_COLUMNS = (
    "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
    "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
)  # fmt: skip
MICROSECONDS = 1_000_000
# int8, int2, int4 come as int, numeric (SHOW STATS's counters) as float (see PgBouncerSource._snapshot).
NUMBER_TYPES = frozenset({20, 21, 23, 1700})

T = TypeVar("T")
Position = int | tuple[int, ...] | None  # where a column is in a result's rows (Result.position)


class Result:
    """One SHOW result: its column names, and its rows as the server sent them.

    ``rows`` may be read any number of times: a list, or a cursor's rows (``CursorRows``), which stay
    in libpq's memory and become Python values a few at a time, on each pass.
    """

    def __init__(self, columns: Sequence[str], rows: Iterable[Sequence[Any]], numbers: Iterable[int] = ()):
        """``numbers``: the positions of the columns the driver gives as int or float (or None), not text."""
        self.columns = list(columns)
        self.rows = rows
        self.numbers = frozenset(numbers)
        self._index = {name: i for i, name in enumerate(self.columns)}

    def position(self, *names: str) -> Position:
        """Where ``names`` (one column's names across versions, newest first) are: None if nowhere, an
        index if one is there, else the indexes, of which a row's first value that is not NULL counts."""
        found = tuple(self._index[name] for name in names if name in self._index)
        return None if not found else found[0] if len(found) == 1 else found

    def getter(self, *names: str) -> Callable[[Sequence[Any]], Any]:
        """A function reading a row's value of the first of ``names`` that is not NULL, or None.

        ``names`` are one column's names across versions, newest first.
        """
        found = [self._index[name] for name in names if name in self._index]
        if not found:
            return lambda row: None
        if len(found) == 1:
            i = found[0]
            return lambda row: row[i]
        return lambda row: next((row[i] for i in found if row[i] is not None), None)

    @classmethod
    def from_dicts(cls, rows: Sequence[dict[str, Any]]) -> Result:
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        return cls(columns, [tuple(row.get(c) for c in columns) for row in rows])


class CursorRows:
    """A cursor's rows, from the first on each pass: each pass keeps its own place, so that passes may
    nest, and holds a few rows at a time. The result stays in libpq's memory until the cursor goes."""

    CHUNK = 16

    def __init__(self, cursor: psycopg.Cursor[Any]):
        self.cursor = cursor

    def __iter__(self) -> Iterator[Sequence[Any]]:
        return chain.from_iterable(self._chunks())

    def _chunks(self) -> Iterator[list[Any]]:
        cursor, position = self.cursor, 0
        total = cursor.pgresult.ntuples if cursor.pgresult is not None else 0
        while position < total:
            cursor.scroll(position, "absolute")
            rows = cursor.fetchmany(self.CHUNK)
            if not rows:
                return
            position += len(rows)
            yield rows


class Records(Generic[T]):
    """Records made from a result's rows on each pass, none kept; rows ``make`` turns into None are left out."""

    def __init__(self, rows: Iterable[Sequence[Any]], make: Callable[[Sequence[Any]], T | None]):
        self.rows = rows
        self.make = make

    def __iter__(self) -> Iterator[T]:
        # Records are tuples of several fields, never empty: filter(None, ...) drops only the None.
        return filter(None, map(self.make, self.rows))


class Names:
    """One column's values as text, the admin database's own left out, on each pass. From a cursor's
    rows, each value is read from its cell in libpq's memory, without making the rest of the row."""

    def __init__(self, result: Result, *names: str):
        found = result.position(*names)
        self.rows = result.rows
        self.position = found if isinstance(found, int) else None if found is None else found[0]

    def __iter__(self) -> Iterator[str]:
        at = self.position
        if at is None:
            return iter(())
        cells = self.rows.cursor.pgresult if isinstance(self.rows, CursorRows) else None
        if cells is not None:
            get = cells.get_value
            texts: Iterable[str] = (_decode(get(i, at)) for i in range(cells.ntuples))
        else:
            texts = (_text(row[at]) for row in self.rows)
        return (text for text in texts if text != ADMIN_DB)


def _decode(cell: bytes | None) -> str:
    return "" if cell is None else cell.decode("utf-8", "replace")


def number(value: Any) -> float | None:
    """A column value as a number (an integer as it is); None for NULL or text that is not one."""
    if value.__class__ is int or value is None:
        return value
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _at(row: Sequence[Any], position: Position) -> Any:
    if position is None:
        return None
    if isinstance(position, int):
        return row[position]
    return next((row[i] for i in position if row[i] is not None), None)


def parse_config(result: Result) -> PgbConfig:
    key, value = result.getter("key"), result.getter("value")
    values = {_text(key(row)): value(row) for row in result.rows}

    def number_of(name: str) -> float | None:
        n = number(values.get(name))
        return None if n is None else float(n)

    return PgbConfig(
        max_client_conn=number_of("max_client_conn"),
        default_pool_size=number_of("default_pool_size"),
        reserve_pool_size=number_of("reserve_pool_size"),
        min_pool_size=number_of("min_pool_size"),
        max_db_connections=number_of("max_db_connections"),
        pool_mode=_text(values["pool_mode"]) if values.get("pool_mode") else None,
        server_idle_timeout=number_of("server_idle_timeout"),
        client_idle_timeout=number_of("client_idle_timeout"),
        max_prepared_statements=number_of("max_prepared_statements"),
        server_lifetime=number_of("server_lifetime"),
    )


def _numbers(result: Result, positions: Sequence[Position]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """A function reading a row's values at ``positions`` as numbers: in one step, the row left as it
    is, where each is one column the driver gives as a number already."""
    if all(isinstance(p, int) and p in result.numbers for p in positions):
        if len(positions) == 1:
            only = positions[0]
            return lambda row: (row[only],)  # type: ignore[index]
        return itemgetter(*positions)
    return lambda row: [number(_at(row, p)) for p in positions]


DATABASE_COLUMNS = (
    ("pool_size",), ("reserve_pool_size", "reserve_pool"), ("max_connections",), ("current_connections",),
    ("paused",), ("disabled",), ("min_pool_size",),
)  # fmt: skip


def parse_databases(result: Result) -> Records[PgbDatabase]:
    name, mode = result.position("name"), result.position("pool_mode")
    numbers = _numbers(result, [result.position(*names) for names in DATABASE_COLUMNS])
    make = PgbDatabase._make

    def database(row: Sequence[Any]) -> PgbDatabase | None:
        db = _text(_at(row, name))
        if db == ADMIN_DB:
            return None
        return make((db, _text(_at(row, mode)) or None, *numbers(row)))

    return Records(result.rows, database)


def parse_pools(result: Result, databases: Result, config: PgbConfig) -> Records[PgbPool]:
    """Pools with their database's pool size (SHOW DATABASES), else default_pool_size, and their pool mode:
    the row's, else the database's (before the column came), else the server's default."""
    db, user, mode = result.position("database"), result.position("user"), result.position("pool_mode")
    maxwait, maxwait_us = result.position("maxwait"), result.position("maxwait_us")
    numbers = _numbers(result, [result.position(column) for column in POOL_COLUMNS])
    default_size, default_mode = config.default_pool_size, config.pool_mode or "unknown"
    # Only what differs from the defaults: as small as the configuration is unusual, whatever the pools.
    sizes: dict[str, float] = {}
    modes: dict[str, str] = {}
    name_at, size_at, mode_at = databases.position("name"), databases.position("pool_size"), None
    if mode is None:
        mode_at = databases.position("pool_mode")
    for row in databases.rows:
        size = number(_at(row, size_at))
        if size is not None and size >= 0 and size != default_size:
            sizes[_text(_at(row, name_at))] = size
        if (database_mode := _at(row, mode_at)) and database_mode != default_mode:
            modes[_text(_at(row, name_at))] = _text(database_mode)
    make = PgbPool._make

    if (
        isinstance(db, int)
        and isinstance(user, int)
        and isinstance(mode, int)
        and {maxwait, maxwait_us} <= result.numbers
    ):
        # Every column where one name says, as the driver gives it (1.18 on): no conversion to make.
        names = itemgetter(db, user, mode, maxwait, maxwait_us)

        def fast(row: Sequence[Any]) -> PgbPool | None:
            name, user_name, pool_mode, wait, micros = names(row)
            if name == ADMIN_DB:
                return None
            if micros:
                wait += micros / MICROSECONDS
            pool_mode = pool_mode or modes.get(name, default_mode)
            return make((name, user_name or "", pool_mode, sizes.get(name, default_size), *numbers(row), wait))

        return Records(result.rows, fast)

    def pool(row: Sequence[Any]) -> PgbPool | None:
        name = _text(_at(row, db))
        if name == ADMIN_DB:
            return None
        wait = number(_at(row, maxwait))
        if wait is not None:
            micros = number(_at(row, maxwait_us))
            if micros:
                wait += micros / MICROSECONDS
        pool_mode = _at(row, mode) or modes.get(name, default_mode)
        return make((name, _text(_at(row, user)), pool_mode, sizes.get(name, default_size), *numbers(row), wait))

    return Records(result.rows, pool)


STATS_COLUMNS = (
    ("total_xact_count",), ("total_query_count", "total_requests"), ("total_received",), ("total_sent",),
)  # fmt: skip
STATS_TIMES = (("total_xact_time",), ("total_query_time",), ("total_wait_time",))


def parse_stats(result: Result) -> Records[PgbStats]:
    db = result.position("database", "name")
    counts = _numbers(result, [result.position(*names) for names in STATS_COLUMNS])
    times = _numbers(result, [result.position(*names) for names in STATS_TIMES])
    make = PgbStats._make

    def stats(row: Sequence[Any]) -> PgbStats | None:
        name = _text(_at(row, db))
        if name == ADMIN_DB:
            return None
        seconds = [None if micros is None else micros / MICROSECONDS for micros in times(row)]
        return make((name, *counts(row), *seconds))

    return Records(result.rows, stats)


def parse_lists(result: Result) -> dict[str, int]:
    item, count = result.getter("list"), result.getter("items")
    lists = {}
    for row in result.rows:
        value = number(count(row))
        if value is not None:
            lists[_text(item(row))] = int(value)
    return lists


def parse_servers(result: Result) -> tuple[PgbServer, ...]:
    """SHOW SERVERS: each of PgBouncer's connections to a PostgreSQL server (1.15 to 1.26 name them alike)."""
    db, user, state = result.getter("database"), result.getter("user"), result.getter("state")
    addr, port, local_port = result.getter("addr"), result.getter("port"), result.getter("local_port")
    pid, link, app = result.getter("remote_pid"), result.getter("link"), result.getter("application_name")
    local_addr = result.getter("local_addr")
    servers = []
    for row in result.rows:
        name = _text(db(row))
        if name == ADMIN_DB:
            continue
        where = (_text(addr(row)), _integer(port(row)), _integer(local_port(row)), _integer(pid(row)))
        found = PgbServer(name, _text(user(row)), _text(state(row)), *where, bool(link(row)), _text(app(row)))
        servers.append(found._replace(local_addr=_text(local_addr(row))))
    return tuple(servers)


def _integer(value: Any) -> int | None:
    n = number(value)
    return None if n is None else int(n)


def parse_version(texts: Sequence[str]) -> str | None:
    """``1.18.0`` from SHOW VERSION's row, or from the NOTICE older versions send instead."""
    for text in texts:
        match = re.search(r"PgBouncer\s+(?:version\s+)?(\d+\.\d+(?:\.\d+)?)", text)
        if match:
            return match.group(1)
    return None


def version_texts(result: Result) -> list[str]:
    return [" ".join(_text(v) for v in row) for row in result.rows]


def snapshot_from_results(results: dict[str, Result], new_connection: bool = False) -> PgbSnapshot:
    """A snapshot from SHOW results, keyed by the SHOW command's name."""
    empty = Result([], [])
    return snapshot_of(
        results,
        parse_config(results.get("CONFIG", empty)),
        parse_version(version_texts(results.get("VERSION", empty))),
        new_connection,
    )


def snapshot_of(results: dict[str, Result], config: PgbConfig, version: str | None, new: bool) -> PgbSnapshot:
    """A snapshot from the results of one run's SHOW commands and what was read on connecting."""
    empty = Result([], [])
    databases, pools, stats = (results.get(name, empty) for name in ("DATABASES", "POOLS", "STATS"))
    names = PgbNames(Names(pools, "database"), Names(databases, "name"), Names(stats, "database", "name"),
                     Names(pools, "user"))  # fmt: skip
    return PgbSnapshot(
        pools=parse_pools(pools, databases, config),
        databases=parse_databases(databases),
        stats=parse_stats(stats),
        lists=parse_lists(results.get("LISTS", empty)),
        config=config,
        version=version,
        new_connection=new,
        names=names,
        clients=parse_clients(results["CLIENTS"]) if "CLIENTS" in results else None,
    )


class PgBouncerSource(Reconnecting):
    def __init__(self, endpoint: Endpoint, servers: bool = False, every_run: Iterable[LiteralString] = ()):
        """``servers``: read SHOW SERVERS too, to tell PgBouncer's connections among PostgreSQL's backends.
        ``every_run``: SHOW DATABASES or LISTS every run, for the metrics of theirs an `extra_metrics` group asks
        for; without, DATABASES is read now and then (``SETTINGS_SECONDS``) and LISTS never."""
        self.endpoint = endpoint
        self.read_servers = servers
        self.every_run = tuple(every_run)
        self.config = PgbConfig()
        self.version: str | None = None
        self.notices: list[str] = []
        self.databases = Result([], [])
        self.known: set[str] = set()  # the databases and pools when DATABASES was last read
        self.settings_read_at = 0.0

    def snapshot(self) -> PgbSnapshot:
        """Read the console; a connection found broken is opened again at once, any other failure next run."""
        return self.read(self._snapshot)

    def _snapshot(self) -> PgbSnapshot:
        conn = self.conn
        new = conn is None or conn.closed
        if conn is None or new:
            # The console speaks the simple query protocol only: client-side binding, no prepares.
            conn = self.open(cursor_factory=psycopg.ClientCursor, prepare_threshold=None)
            # SHOW STATS's counters are numeric: floats, as the metrics want them, and far cheaper than Decimal.
            conn.adapters.register_loader("numeric", FloatLoader)
            self.notices = []
            conn.add_notice_handler(lambda diag: self.notices.append(diag.message_primary or ""))
        with deadline(conn, self.endpoint.query_timeout):
            due = new or time.monotonic() - self.settings_read_at >= SETTINGS_SECONDS
            if due:
                config, version = (self._show(conn, name, fetch=True) for name in ON_CONNECT)
                texts = version_texts(version) or self.notices  # before 1.12 the version came as a NOTICE
                self.config, self.version = parse_config(config), parse_version(texts)
            # One round trip each; the rows stay in libpq's memory, read as the evaluation goes.
            results = {name: self._show(conn, name) for name in PER_RUN}
            results.update((name, self._show(conn, name, fetch=True)) for name in self.every_run)
            if "DATABASES" not in results:
                pools = set(Names(results["POOLS"], "database"))
                if due or not pools <= self.known:
                    self.databases = self._show(conn, "DATABASES", fetch=True)
                    # A pool may outlive its database (removed by a RELOAD): known too, not read again for it.
                    self.known = set(Names(self.databases, "name")) | pools
                results["DATABASES"] = self.databases
            if due:
                self.settings_read_at = time.monotonic()
            servers = self._servers(conn)
        return replace(snapshot_of(results, self.config, self.version, new), servers=servers)

    def _servers(self, conn: psycopg.Connection[Any]) -> tuple[PgbServer, ...]:
        """SHOW SERVERS when PostgreSQL is monitored too: a few rows, one per server connection."""
        return parse_servers(self._show(conn, "SERVERS", fetch=True)) if self.read_servers else ()

    def config_now(self) -> PgbConfig:
        """SHOW CONFIG again on the kept connection, where a RELOAD since the check connected matters to what
        the run says. What was read before stands if the console cannot answer; the connection is then
        opened again next run."""
        conn = self.conn
        if conn is None or conn.closed:
            return self.config
        try:
            with deadline(conn, self.endpoint.query_timeout):
                self.config = parse_config(self._show(conn, "CONFIG", fetch=True))
        except Exception:
            self.close()
        return self.config

    @staticmethod
    def _show(conn: psycopg.Connection[Any], what: LiteralString, fetch: bool = False) -> Result:
        cursor = conn.execute("SHOW " + what)
        if cursor.description is None:
            return Result([], [])
        columns = [column.name for column in cursor.description]
        numbers = [i for i, column in enumerate(cursor.description) if column.type_code in NUMBER_TYPES]
        return Result(columns, cursor.fetchall() if fetch else CursorRows(cursor), numbers)
