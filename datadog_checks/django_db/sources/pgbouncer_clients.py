"""SHOW CLIENTS, aggregated as it is read: one row per client connection, thousands of them behind a busy
PgBouncer, counted by the few columns the check uses without making a Python row of any.

Read where libpq keeps the result, each wanted cell as bytes: the rows alike in database, user,
application_name, state, host, last request and whether a server is linked are counted together,
and only those distinct keys are ever decoded. Columns are found by name: before 1.18 there is no
application_name, which then reads as "" for every client.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..records import ADMIN_DB, PgbClientGroup, PgbClients

if TYPE_CHECKING:
    from .pgbouncer import Result

# (db, user, app, state, addr, request_time) as bytes or str, and whether a server is linked
Key = tuple[Any, Any, Any, Any, Any, Any, bool]
COLUMNS = ("database", "user", "application_name", "state", "addr", "request_time")


def _cells(pgresult: Any, column: int | None, rows: int) -> Iterator[bytes | None]:
    if column is None:
        return iter([None] * rows)
    get = pgresult.get_value
    return (get(i, column) for i in range(rows))


def _keys_from_cells(pgresult: Any, positions: Sequence[int | None], link: int | None) -> Iterable[Key]:
    rows = pgresult.ntuples
    columns = [_cells(pgresult, at, rows) for at in positions]
    return zip(*columns, map(bool, _cells(pgresult, link, rows)), strict=True)


def _keys_from_rows(rows: Iterable[Sequence[Any]], positions: Sequence[int | None], link: int | None) -> Iterator[Key]:
    for row in rows:
        values = tuple(None if at is None else row[at] for at in positions)
        yield (*values, bool(row[link]) if link is not None else False)  # type: ignore[misc]


def _decoder() -> Callable[[Any], str]:
    """Text of a cell, each distinct value decoded once."""
    made: dict[Any, str] = {}

    def text(value: Any) -> str:
        found = made.get(value)
        if found is None:
            if value is None:
                found = ""
            elif isinstance(value, bytes):
                found = value.decode("utf-8", "replace")
            else:
                found = str(value)
            made[value] = found
        return found

    return text


def parse_clients(result: Result) -> PgbClients:
    """The clients of one SHOW CLIENTS ``Result`` (sources/pgbouncer.py), counted by what the check reads."""
    found = [result.position(name) for name in COLUMNS]
    positions = [at if isinstance(at, int) else None for at in found]
    link_at = result.position("link")
    link = link_at if isinstance(link_at, int) else None
    cursor = getattr(result.rows, "cursor", None)
    pgresult = cursor.pgresult if cursor is not None else None
    if pgresult is not None:
        counted = Counter(_keys_from_cells(pgresult, positions, link))
    else:
        counted = Counter(_keys_from_rows(result.rows, positions, link))
    total = sum(counted.values())
    text = _decoder()
    groups = []
    now = ""
    for (db, user, app, state, addr, request_time, linked), count in counted.items():
        when = text(request_time)
        if when > now:  # one format, one zone: the newest sorts last
            now = when
        name = text(db)
        if name == ADMIN_DB:
            continue
        groups.append(PgbClientGroup(name, text(user), text(app), text(state), text(addr), when, linked, count))
    return PgbClients(tuple(groups), now, has_app=positions[2] is not None, total=total)
