"""OpenTelemetry's connection-pool metrics under the semantic conventions' current names (1.26 on; the
attributes as 1.28 names them), for every pool the check knows. No I/O.

A pool hands out connections and keeps them: PostgreSQL (or MySQL) itself, one pool of the whole server
(``<host>:<port>``: its usable slots are its limit, once) holding the connections clients make to it directly
(PgBouncer's server connections are counted in PgBouncer's pools, a declared pooler's in none); each PgBouncer
pool (``<host>:<port>/<db>/<user>``); each Django pool read through ``django_metrics`` (``<app>/<alias>``, summed
over the application's processes). A connection counts in one pool only.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

from ..records import PgbSnapshot
from .django_metrics import DjangoRun
from .groups import OTHER
from .model import Metric, tag_value
from .pgbouncer_fold import fold_pgbouncer

COUNT = "db.client.connection.count"
MAX = "db.client.connection.max"
IDLE_MIN = "db.client.connection.idle.min"
PENDING = "db.client.connection.pending_requests"
TIMEOUTS = "db.client.connection.timeouts"
POOL_NAME = "db.client.connection.pool.name:"
USED = "db.client.connection.state:used"
IDLE = "db.client.connection.state:idle"

# PgBouncer's servers by SHOW POOLS column: idle ones wait for a client (sv_used after a server check);
# the others are held by a client, or being reset, checked, logged in or canceled.
PGB_USED = ("sv_active", "sv_being_canceled", "sv_tested", "sv_login")
PGB_IDLE = ("sv_idle", "sv_used")

# PgBouncer's log line for a client that waited past query_wait_timeout names its pool:
# "C-0x55d0c8: appdb/app@127.0.0.1:40126 pooler error: query_wait_timeout".
QUERY_WAIT_TIMEOUT = re.compile(r"\bC-0x[0-9a-f]+: (?P<pool>\S+)@\S* pooler error: query_wait_timeout\b")


class Pool(NamedTuple):
    name: str  # the db.client.connection.pool.name attribute
    used: float
    idle: float
    max: float | None = None  # the most connections the pool may open
    idle_min: float | None = None  # the connections it keeps open however idle; None or 0: no minimum
    pending: float | None = None  # requests waiting for a connection; None: the pool has no queue
    timeouts: float = 0.0  # requests that gave up waiting, since the previous run


def pool_metrics(pools: Iterable[Pool], base: tuple[str, ...]) -> Iterator[Metric]:
    """The metrics of each pool; the timeouts count only in a run that saw some."""
    for pool in pools:
        tags = (*base, POOL_NAME + pool.name)
        yield Metric("gauge", COUNT, pool.used, (*tags, USED))
        yield Metric("gauge", COUNT, pool.idle, (*tags, IDLE))
        if pool.max is not None:
            yield Metric("gauge", MAX, pool.max, tags)
        if pool.idle_min:
            yield Metric("gauge", IDLE_MIN, pool.idle_min, tags)
        if pool.pending is not None:
            yield Metric("gauge", PENDING, pool.pending, tags)
        if pool.timeouts:
            yield Metric("count", TIMEOUTS, pool.timeouts, tags)


def server_pools(server_tag: str, by_db: Mapping[str, tuple[float, float]], slots: float) -> list[Pool]:
    """PostgreSQL or MySQL as one pool: the (used, idle) connections of every database, the server's slots."""
    used = sum(u for u, _ in by_db.values())
    idle = sum(i for _, i in by_db.values())
    return [Pool(server_tag, used, idle, slots)]


def _n(value: float | None) -> float:
    return value or 0.0


def _setting(own: float | None, default: float | None) -> float:
    """A database's own pool setting, else the server's (PgBouncer shows -1 for "not set" in some versions)."""
    return _n(default) if own is None or own < 0 else own


def pgbouncer_pools(
    snapshot: PgbSnapshot, server_tag: str, limit: int, timeouts: Mapping[str, float] | None = None
) -> list[Pool]:
    """Each PgBouncer pool, its database and user names bounded as the django_db.pgbouncer.* metrics bound
    them (pools folded into ``other`` are summed). ``timeouts``: query_wait_timeout failures by ``db/user``,
    as PgBouncer's log names the pool."""
    _, folded = fold_pgbouncer(snapshot, limit)
    other_dbs, other_users = set(folded.get("pgbouncer_db", ())), set(folded.get("user", ()))
    config = snapshot.config
    reserve: dict[str, float] = {}
    minimum: dict[str, float] = {}
    for database in snapshot.databases:
        reserve[database.name] = _setting(database.reserve_pool_size, config.reserve_pool_size)
        minimum[database.name] = _setting(database.min_pool_size, config.min_pool_size)
    # by pool name: used, idle, max, idle.min, pending, timeouts
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    unlimited: set[str] = set()
    for pool in snapshot.pools:
        db = OTHER if pool.db in other_dbs else pool.db
        user = OTHER if pool.user in other_users else pool.user
        name = f"{server_tag}/{tag_value(db)}/{tag_value(user)}"
        figures = sums[name]
        figures[0] += sum(_n(getattr(pool, column)) for column in PGB_USED)
        figures[1] += sum(_n(getattr(pool, column)) for column in PGB_IDLE)
        if pool.pool_size is None:
            unlimited.add(name)
        else:
            figures[2] += pool.pool_size + reserve.get(pool.db, _n(config.reserve_pool_size))
            figures[3] += min(pool.pool_size, minimum.get(pool.db, _n(config.min_pool_size)))
        figures[4] += _n(pool.cl_waiting)
        if timeouts:
            figures[5] += timeouts.get(f"{pool.db}/{pool.user}", 0.0)
    return [
        Pool(name, used, idle, None if name in unlimited else most, least, waiting, failed)
        for name, (used, idle, most, least, waiting, failed) in sums.items()
    ]


def query_wait_timeouts(lines: Iterable[str]) -> Counter[str]:
    """Clients PgBouncer's log says waited past query_wait_timeout, by the pool's ``db/user``."""
    found: Counter[str] = Counter()
    for line in lines:
        if "query_wait_timeout" in line and (match := QUERY_WAIT_TIMEOUT.search(line)):
            found[match["pool"]] += 1
    return found


DJANGO_FIGURES = ("size", "available", "max_size", "min_size", "requests_waiting")


def django_pools(run: DjangoRun) -> list[Pool]:
    """Each Django pool (``<app>/<alias>``), its get_stats() figures summed over the application's processes;
    the timeouts are its requests_errors counter's growth since the previous read of each endpoint."""
    sums: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for scrape in run.scrapes:
        for pool in scrape.pools:
            figures = sums[scrape.app, pool.alias]
            for field in DJANGO_FIGURES:
                if (value := getattr(pool, field)) is not None:
                    figures[field] = figures.get(field, 0.0) + value
    timeouts: dict[tuple[str, str], float] = defaultdict(float)
    for interval in run.intervals:
        for alias, growth in interval.growth.items():
            if growth.pooled:
                timeouts[interval.app, alias] += growth.pool_timeouts
    pools = []
    for (app, alias), figures in sorted(sums.items()):
        if "size" not in figures or "available" not in figures:
            continue
        size, available = figures["size"], figures["available"]
        pools.append(
            Pool(
                f"{tag_value(app)}/{tag_value(alias)}",
                max(0.0, size - available),
                available,
                figures.get("max_size"),
                figures.get("min_size"),
                figures.get("requests_waiting"),
                timeouts.get((app, alias), 0.0),
            )
        )
    return pools
