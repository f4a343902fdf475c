"""PgBouncer source: the admin console over one persistent connection, normalised into records.

Every SHOW result is read by column name, resolved once per result: a column a version lacks
is None, an unknown one is ignored, a renamed one (``reserve_pool`` to ``reserve_pool_size``)
feeds the same field. The admin database's own rows are left out here, once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, LiteralString

import psycopg

from ..config import Endpoint
from ..connection import Reconnecting, deadline
from ..records import ADMIN_DB, PgbConfig, PgbDatabase, PgbPool, PgbSnapshot, PgbStats

PER_RUN: tuple[LiteralString, ...] = ("POOLS", "STATS", "DATABASES", "LISTS")
ON_CONNECT: tuple[LiteralString, ...] = ("CONFIG", "VERSION")

POOL_COLUMNS = (
    "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
    "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
)  # fmt: skip
MICROSECONDS = 1_000_000


class Result:
    """One SHOW result: its column names and rows as the server sent them."""

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]):
        self.columns = list(columns)
        self.rows = rows
        self._index = {name: i for i, name in enumerate(self.columns)}

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


def number(value: Any) -> float | None:
    """A column value as a number; None for NULL or text that is not one."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def parse_config(result: Result) -> PgbConfig:
    key, value = result.getter("key"), result.getter("value")
    values = {_text(key(row)): value(row) for row in result.rows}
    return PgbConfig(
        max_client_conn=number(values.get("max_client_conn")),
        default_pool_size=number(values.get("default_pool_size")),
        reserve_pool_size=number(values.get("reserve_pool_size")),
        max_db_connections=number(values.get("max_db_connections")),
        pool_mode=_text(values["pool_mode"]) if values.get("pool_mode") else None,
        server_idle_timeout=number(values.get("server_idle_timeout")),
        client_idle_timeout=number(values.get("client_idle_timeout")),
    )


def parse_databases(result: Result) -> tuple[PgbDatabase, ...]:
    name, mode = result.getter("name"), result.getter("pool_mode")
    size, reserve = result.getter("pool_size"), result.getter("reserve_pool_size", "reserve_pool")
    limit, current = result.getter("max_connections"), result.getter("current_connections")
    paused, disabled = result.getter("paused"), result.getter("disabled")
    return tuple(
        PgbDatabase(
            name=_text(name(row)),
            pool_mode=_text(mode(row)) or None,
            pool_size=number(size(row)),
            reserve_pool_size=number(reserve(row)),
            max_connections=number(limit(row)),
            current_connections=number(current(row)),
            paused=number(paused(row)),
            disabled=number(disabled(row)),
        )
        for row in result.rows
        if _text(name(row)) != ADMIN_DB
    )


def parse_pools(result: Result, databases: Sequence[PgbDatabase], config: PgbConfig) -> tuple[PgbPool, ...]:
    db, user, mode = result.getter("database"), result.getter("user"), result.getter("pool_mode")
    maxwait, maxwait_us = result.getter("maxwait"), result.getter("maxwait_us")
    columns = [(column, result.getter(column)) for column in POOL_COLUMNS if column in result.columns]
    modes = {d.name: d.pool_mode for d in databases}
    sizes = {d.name: d.pool_size for d in databases if d.pool_size is not None and d.pool_size >= 0}
    pools = []
    for row in result.rows:
        name = _text(db(row))
        if name == ADMIN_DB:
            continue
        wait = number(maxwait(row))
        if wait is not None:
            wait += (number(maxwait_us(row)) or 0.0) / MICROSECONDS
        pools.append(
            PgbPool(
                db=name,
                user=_text(user(row)),
                pool_mode=_text(mode(row)) or modes.get(name) or config.pool_mode or "unknown",
                pool_size=sizes.get(name, config.default_pool_size),
                maxwait=wait,
                **{column: number(get(row)) for column, get in columns},
            )
        )
    return tuple(pools)


def parse_stats(result: Result) -> tuple[PgbStats, ...]:
    db = result.getter("database", "name")
    xacts, queries = result.getter("total_xact_count"), result.getter("total_query_count", "total_requests")
    received, sent = result.getter("total_received"), result.getter("total_sent")
    xact_time, query_time = result.getter("total_xact_time"), result.getter("total_query_time")
    wait_time = result.getter("total_wait_time")

    def seconds(value: Any) -> float | None:
        n = number(value)
        return None if n is None else n / MICROSECONDS

    return tuple(
        PgbStats(
            db=_text(db(row)),
            transactions=number(xacts(row)),
            queries=number(queries(row)),
            bytes_received=number(received(row)),
            bytes_sent=number(sent(row)),
            xact_time=seconds(xact_time(row)),
            query_time=seconds(query_time(row)),
            wait_time=seconds(wait_time(row)),
        )
        for row in result.rows
        if _text(db(row)) != ADMIN_DB
    )


def parse_lists(result: Result) -> dict[str, int]:
    item, count = result.getter("list"), result.getter("items")
    lists = {}
    for row in result.rows:
        value = number(count(row))
        if value is not None:
            lists[_text(item(row))] = int(value)
    return lists


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
    config = parse_config(results.get("CONFIG", empty))
    databases = parse_databases(results.get("DATABASES", empty))
    return PgbSnapshot(
        pools=parse_pools(results.get("POOLS", empty), databases, config),
        databases=databases,
        stats=parse_stats(results.get("STATS", empty)),
        lists=parse_lists(results.get("LISTS", empty)),
        config=config,
        version=parse_version(version_texts(results.get("VERSION", empty))),
        new_connection=new_connection,
    )


class PgBouncerSource(Reconnecting):
    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.cached: dict[str, Result] = {}
        self.notices: list[str] = []

    def snapshot(self) -> PgbSnapshot:
        """Read the console; a connection found broken is opened again at once, any other failure next run."""
        return self.read(self._snapshot)

    def _snapshot(self) -> PgbSnapshot:
        conn = self.conn
        new = conn is None or conn.closed
        if conn is None or new:
            # The console speaks the simple query protocol only: client-side binding, no prepares.
            conn = self.open(cursor_factory=psycopg.ClientCursor, prepare_threshold=None)
            self.notices = []
            conn.add_notice_handler(lambda diag: self.notices.append(diag.message_primary or ""))
        results: dict[str, Result] = {}
        with deadline(conn, self.endpoint.query_timeout):
            if new:
                self.cached = {name: self._show(conn, name) for name in ON_CONNECT}
                if not self.cached["VERSION"].rows:  # before 1.12 the version came as a NOTICE
                    self.cached["VERSION"] = Result(["version"], [(notice,) for notice in self.notices])
            for name in PER_RUN:
                results[name] = self._show(conn, name)
        return snapshot_from_results({**self.cached, **results}, new_connection=new)

    @staticmethod
    def _show(conn: psycopg.Connection[Any], what: LiteralString) -> Result:
        cursor = conn.execute("SHOW " + what)
        if cursor.description is None:
            return Result([], [])
        return Result([column.name for column in cursor.description], cursor.fetchall())
