"""PgBouncer records to metrics. No I/O.

The metrics come as a generator, pool after pool, so that the check submits each one as it is made:
nothing proportional to the number of pools is built besides the records themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from operator import itemgetter

from ..records import PgbPool, PgbSnapshot
from ..settings import Settings
from .model import Kind, Metric, tag_value
from .pgbouncer_fold import fold_pgbouncer

PREFIX = "django_db.pgbouncer."

# SHOW POOLS columns sent by default: who holds the server connections, who waits and for how long.
POOL_GAUGES = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "maxwait")
# Columns sent only when `extra_metrics` names their group.
POOL_GROUPS = {
    "pgbouncer_cancel": ("cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel", "sv_being_canceled"),
    "pgbouncer_server_states": ("sv_used", "sv_tested", "sv_login"),
}

# SHOW LISTS items (1.8 to 1.25), sent with `pgbouncer_lists`; an item a later version adds is left out until
# it has a metadata row. django_db.pgbouncer.clients is counted from SHOW CLIENTS.
LIST_ITEMS = (
    "databases", "users", "pools", "free_clients", "used_clients", "login_clients",
    "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries", "dns_pending",
)  # fmt: skip

# SHOW DATABASES: a database's limit of server connections, sent only where one is set; with
# `pgbouncer_databases`, the connections it holds (its pools' sv_* summed say the same) and its settings.
DATABASE_GAUGES = ("max_connections",)
DATABASE_GROUP = ("current_connections", "pool_size", "reserve_pool_size", "paused", "disabled")

# SHOW STATS: the load and the time clients waited; the rest with `pgbouncer_stats`.
STATS_RATES = ("transactions", "wait_time")
STATS_GROUP = ("queries", "bytes_received", "bytes_sent", "xact_time", "query_time")


def used_clients(snapshot: PgbSnapshot) -> int | None:
    """Client connections PgBouncer holds, its console's included: SHOW CLIENTS's rows (SHOW LISTS's used_clients
    where CLIENTS was not read)."""
    if snapshot.clients is not None:
        return snapshot.clients.total
    return snapshot.lists.get("used_clients")


def client_utilization(snapshot: PgbSnapshot) -> float | None:
    limit = snapshot.config.max_client_conn
    clients = used_clients(snapshot)
    if not limit or clients is None:
        return None
    return clients / limit


def database_limit(own: float | None, default: float | None) -> float | None:
    """A database's server connection limit: its own max_db_connections, else the global one; None when
    neither is set, since PgBouncer's 0 means no limit and a 0 on a graph would read as no connection allowed."""
    return own or default or None


def _named(kind: str, columns: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(column, metric name) pairs, the names made once per run rather than once per row."""
    return tuple((column, f"{PREFIX}{kind}.{column}") for column in columns)


class _Tags:
    """``key:value`` tags of the values a run meets again and again (users, pool modes), made once each."""

    def __init__(self, key: str):
        self.prefix = key + ":"
        self.made: dict[str, str] = {}

    def __call__(self, value: str) -> str:
        tag = self.made.get(value)
        if tag is None:
            tag = self.made[value] = self.prefix + tag_value(value)
        return tag


def pgbouncer_metrics(snapshot: PgbSnapshot, settings: Settings) -> Iterator[Metric]:
    """Pool by pool, then database by database: each record's tags are made once, for all its metrics."""
    assert settings.pgbouncer is not None
    snapshot, _ = fold_pgbouncer(snapshot, settings.max_tag_values)  # pgbouncer_db and user: at most max_tag_values
    extra = settings.extra_metrics
    base = (settings.pgbouncer.tag, *settings.tags)
    gauge: Kind = "gauge"
    rate: Kind = "rate"

    pool_columns = POOL_GAUGES + tuple(c for group, cs in POOL_GROUPS.items() if group in extra for c in cs)
    pool_names = [name for _, name in _named("pools", pool_columns)]
    pool_values = itemgetter(*(PgbPool._fields.index(column) for column in pool_columns))
    utilization_name = PREFIX + "pools.server_utilization"
    user_tag, mode_tag = _Tags("user"), _Tags("pool_mode")
    for pool in snapshot.pools:
        tags = (*base, f"pgbouncer_db:{tag_value(pool.db)}", user_tag(pool.user), mode_tag(pool.pool_mode))
        for name, value in zip(pool_names, pool_values(pool), strict=True):
            if value is not None:
                yield Metric(gauge, name, value, tags)
        if pool.pool_size and pool.sv_active is not None:
            yield Metric(gauge, utilization_name, pool.sv_active / pool.pool_size, tags)

    database_names = _named("databases", DATABASE_GAUGES + (DATABASE_GROUP if "pgbouncer_databases" in extra else ()))
    default_limit = snapshot.config.max_db_connections
    for database in snapshot.databases:
        tags = (*base, f"pgbouncer_db:{tag_value(database.name)}")
        for column, name in database_names:
            value = getattr(database, column)
            if column == "max_connections":
                value = database_limit(value, default_limit)
            if value is not None:
                yield Metric(gauge, name, value, tags)

    stats_names = _named("stats", STATS_RATES + (STATS_GROUP if "pgbouncer_stats" in extra else ()))
    for stats in snapshot.stats:
        tags = (*base, f"pgbouncer_db:{tag_value(stats.db)}")
        for column, name in stats_names:
            if (value := getattr(stats, column)) is not None:
                yield Metric(rate, name, value, tags)

    if snapshot.config.max_client_conn is not None:
        yield Metric(gauge, PREFIX + "max_client_conn", snapshot.config.max_client_conn, base)
    if (clients := used_clients(snapshot)) is not None:
        yield Metric(gauge, PREFIX + "clients", clients, base)
    if (utilization := client_utilization(snapshot)) is not None:
        yield Metric(gauge, PREFIX + "client_utilization", utilization, base)
    if "pgbouncer_lists" in extra:
        for item in LIST_ITEMS:
            if (count := snapshot.lists.get(item)) is not None:
                yield Metric(gauge, f"{PREFIX}lists.{item}", count, base)
