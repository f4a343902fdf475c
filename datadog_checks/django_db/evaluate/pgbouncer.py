"""PgBouncer records to metrics. No I/O."""

from __future__ import annotations

from ..config import Settings
from ..records import PgbSnapshot
from .model import Metric, tag_value
from .pgbouncer_fold import fold_pgbouncer

PREFIX = "django_db.pgbouncer."

POOL_GAUGES = (
    "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
    "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
    "maxwait",
)  # fmt: skip

# SHOW LISTS items (1.8 to 1.25); an item a later version adds is left out until it has a metadata row.
LIST_ITEMS = (
    "databases", "users", "pools", "free_clients", "used_clients", "login_clients",
    "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries", "dns_pending",
)  # fmt: skip

DATABASE_GAUGES = ("pool_size", "reserve_pool_size", "max_connections", "current_connections", "paused", "disabled")
STATS_RATES = ("transactions", "queries", "bytes_received", "bytes_sent", "xact_time", "query_time", "wait_time")


def client_utilization(snapshot: PgbSnapshot) -> float | None:
    limit = snapshot.config.max_client_conn
    clients = snapshot.lists.get("used_clients")
    if not limit or clients is None:
        return None
    return clients / limit


def database_limit(own: float | None, default: float | None) -> float | None:
    """A database's server connection limit: its own max_db_connections, else the global one; None when
    neither is set, since PgBouncer's 0 means no limit and a 0 on a graph would read as no connection allowed."""
    return own or default or None


def pgbouncer_metrics(snapshot: PgbSnapshot, settings: Settings) -> list[Metric]:
    assert settings.pgbouncer is not None
    snapshot, _ = fold_pgbouncer(snapshot, settings.max_tag_values)  # pgbouncer_db and user: at most max_tag_values
    base = (settings.pgbouncer.tag, *settings.tags)
    metrics: list[Metric] = []

    for pool in snapshot.pools:
        tags = (*base, f"pgbouncer_db:{tag_value(pool.db)}", f"user:{tag_value(pool.user)}",
                f"pool_mode:{tag_value(pool.pool_mode)}")  # fmt: skip
        for column in POOL_GAUGES:
            if (value := getattr(pool, column)) is not None:
                metrics.append(Metric("gauge", f"{PREFIX}pools.{column}", value, tags))
        if pool.pool_size and pool.sv_active is not None:
            metrics.append(Metric("gauge", PREFIX + "pools.server_utilization", pool.sv_active / pool.pool_size, tags))

    for database in snapshot.databases:
        tags = (*base, f"pgbouncer_db:{tag_value(database.name)}")
        for name in DATABASE_GAUGES:
            value = getattr(database, name)
            if name == "max_connections":
                value = database_limit(value, snapshot.config.max_db_connections)
            if value is not None:
                metrics.append(Metric("gauge", f"{PREFIX}databases.{name}", value, tags))

    for stats in snapshot.stats:
        tags = (*base, f"pgbouncer_db:{tag_value(stats.db)}")
        for name in STATS_RATES:
            if (value := getattr(stats, name)) is not None:
                metrics.append(Metric("rate", f"{PREFIX}stats.{name}", value, tags))

    if snapshot.config.max_client_conn is not None:
        metrics.append(Metric("gauge", PREFIX + "max_client_conn", snapshot.config.max_client_conn, base))
    if "used_clients" in snapshot.lists:
        metrics.append(Metric("gauge", PREFIX + "clients", snapshot.lists["used_clients"], base))
    if (utilization := client_utilization(snapshot)) is not None:
        metrics.append(Metric("gauge", PREFIX + "client_utilization", utilization, base))
    for item in LIST_ITEMS:
        if (count := snapshot.lists.get(item)) is not None:
            metrics.append(Metric("gauge", f"{PREFIX}lists.{item}", count, base))
    return metrics
