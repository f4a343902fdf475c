"""Bounded tag values on the PgBouncer side. No I/O.

PgBouncer keeps a database entry (and its pools and stats rows) for every name a client asks
for through a ``*`` entry, even one the server then refuses: without a cap, any client could
make as many ``pgbouncer_db`` tag values as it likes. As on the PostgreSQL side, the
``max_tag_values`` largest values of each dimension are kept and the rest fold into ``other``,
their rows merged into one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from heapq import merge
from itertools import chain
from operator import itemgetter
from typing import Any, TypeVar

from ..records import PgbConfig, PgbDatabase, PgbNames, PgbPool, PgbSnapshot, PgbStats
from .groups import OTHER

# Connections a pool holds now, clients and servers alike: what ranks a database or a user.
HELD = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")

R = TypeVar("R", PgbPool, PgbDatabase, PgbStats)


def _n(value: float | None) -> float:
    return value or 0.0


def _kept(names: Iterable[str], *ranks: Mapping[str, float], limit: int) -> set[str] | None:
    """The ``limit`` names ranked first (largest ranks, then by name), or None when all fit."""
    unique = set(names)
    if len(unique) <= limit:
        return None
    return set(sorted(unique, key=lambda name: (*(-rank.get(name, 0.0) for rank in ranks), name))[:limit])


def _more_than(names: Iterable[str], limit: int) -> bool:
    """Whether there are more than ``limit`` distinct names; holds at most ``limit + 1`` of them."""
    seen: set[str] = set()
    for name in names:
        seen.add(name)
        if len(seen) > limit:
            return True
    return False


def _more_than_in_order(names: Iterable[str], limit: int) -> bool | None:
    """Whether there are more than ``limit`` distinct names in a stream sorted by name, holding one of them;
    None when the stream turns out not to be sorted."""
    count, last = 0, None
    for name in names:
        if last is not None and name < last:
            return None
        if name != last:
            count, last = count + 1, name
            if count > limit:
                return True
    return False


def _total(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _highest(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _merge(rows: list[R], key: Callable[[R], tuple[str, ...]], merge: Callable[[list[R]], R]) -> tuple[R, ...]:
    """Rows grouped by their folded key: a row alone under its own names is kept as it is."""
    groups: dict[tuple[str, ...], list[R]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return tuple(merge(group) for group in groups.values())


def _merge_pools(pools: list[PgbPool]) -> PgbPool:
    columns = dict(zip(PgbPool._fields, zip(*pools, strict=True), strict=True))
    counts = {
        name: _total(columns[name]) for name in PgbPool._fields if name not in ("db", "user", "pool_mode", "maxwait")
    }
    return pools[0]._replace(**counts, maxwait=_highest(columns["maxwait"]))  # type: ignore[arg-type]


def _merge_databases(databases: list[PgbDatabase], config: PgbConfig) -> PgbDatabase:
    def size(own: float | None, default: float | None) -> float | None:
        return default if own is None or own < 0 else own

    limits = [d.max_connections or config.max_db_connections or None for d in databases]
    modes = {d.pool_mode for d in databases}
    return databases[0]._replace(
        pool_mode=modes.pop() if len(modes) == 1 else None,
        pool_size=_total([size(d.pool_size, config.default_pool_size) for d in databases]),
        reserve_pool_size=_total([size(d.reserve_pool_size, config.reserve_pool_size) for d in databases]),
        # Every one limited: the sum of their limits; any one unlimited: no limit (0, as PgBouncer says it).
        max_connections=sum(_n(limit) for limit in limits) if all(limits) else 0.0,
        current_connections=_total([d.current_connections for d in databases]),
        paused=_highest([d.paused for d in databases]),
        disabled=_highest([d.disabled for d in databases]),
    )


def _merge_stats(stats: list[PgbStats]) -> PgbStats:
    columns = dict(zip(PgbStats._fields, zip(*stats, strict=True), strict=True))
    totals = {name: _total(columns[name]) for name in PgbStats._fields if name != "db"}
    return stats[0]._replace(**totals)  # type: ignore[arg-type]


class _Field:
    """One field of records, on each pass."""

    def __init__(self, records: Iterable[Any], name: str):
        self.records, self.name = records, name

    def __iter__(self) -> Iterator[str]:
        return (getattr(record, self.name) for record in self.records)


def _names_of_records(snapshot: PgbSnapshot) -> PgbNames:
    return PgbNames(
        _Field(snapshot.pools, "db"),
        _Field(snapshot.databases, "name"),
        _Field(snapshot.stats, "db"),
        _Field(snapshot.pools, "user"),
    )


def fold_pgbouncer(snapshot: PgbSnapshot, limit: int) -> tuple[PgbSnapshot, dict[str, list[str]]]:
    """The snapshot with at most ``limit`` databases and users (plus ``other``) in its pools, databases
    and stats rows, and the names folded away, by dimension.

    Databases rank by the connections their pools and servers hold now, then by the transactions and
    queries they served since PgBouncer started (a name a refused client asked for has none); users by
    the connections their pools hold.
    A snapshot within the limit is returned as it is, after a pass over its names. PgBouncer keeps its
    databases, and so its pools and stats rows, in name order: merged, the three are counted holding one
    name; in any other order, holding at most ``limit + 1``.
    """

    given = snapshot.names or _names_of_records(snapshot)
    many_dbs = _more_than_in_order(merge(given.pool_dbs, given.databases, given.stats_dbs), limit)
    if many_dbs is None:
        many_dbs = _more_than(chain(given.pool_dbs, given.databases, given.stats_dbs), limit)
    if not many_dbs and not _more_than(given.pool_users, limit):
        return snapshot, {}
    # Folding keeps every row: made into records once here, not again on each pass below.
    pools, databases, stats_rows = list(snapshot.pools), list(snapshot.databases), list(snapshot.stats)
    held_db: dict[str, float] = defaultdict(float)
    held_user: dict[str, float] = defaultdict(float)
    served: dict[str, float] = defaultdict(float)
    held_of = itemgetter(*(PgbPool._fields.index(column) for column in HELD))
    for pool in pools:
        held = sum(value for value in held_of(pool) if value)
        held_db[pool.db] += held
        held_user[pool.user] += held
    for stats in stats_rows:
        served[stats.db] += _n(stats.transactions) + _n(stats.queries)
    names = [p.db for p in pools] + [d.name for d in databases] + [s.db for s in stats_rows]
    dbs = _kept(names, held_db, served, limit=limit)
    users = _kept((p.user for p in pools), held_user, limit=limit)
    if dbs is None and users is None:
        return snapshot, {}

    def db(name: str) -> str:
        return name if dbs is None or name in dbs else OTHER

    def user(name: str) -> str:
        return name if users is None or name in users else OTHER

    def rename_pools(group: list[PgbPool]) -> PgbPool:
        pool = group[0] if len(group) == 1 else _merge_pools(group)
        name, user_name = db(pool.db), user(pool.user)
        if name == pool.db and user_name == pool.user:
            return pool
        return pool._replace(db=name, user=user_name)

    def rename_databases(group: list[PgbDatabase]) -> PgbDatabase:
        if len(group) == 1 and group[0].name == db(group[0].name):
            return group[0]
        return _merge_databases(group, snapshot.config)._replace(name=db(group[0].name))

    def rename_stats(group: list[PgbStats]) -> PgbStats:
        stats = group[0] if len(group) == 1 else _merge_stats(group)
        name = db(stats.db)
        return stats if name == stats.db else stats._replace(db=name)

    folded = {}
    if dbs is not None:
        folded["pgbouncer_db"] = sorted(set(names) - dbs)
    if users is not None:
        folded["user"] = sorted({p.user for p in pools} - users)
    return replace(
        snapshot,
        pools=_merge(pools, lambda p: (db(p.db), user(p.user), p.pool_mode), rename_pools),
        databases=_merge(databases, lambda d: (db(d.name),), rename_databases),
        stats=_merge(stats_rows, lambda s: (db(s.db),), rename_stats),
        names=None,
    ), folded
