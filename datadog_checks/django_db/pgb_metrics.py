"""PgBouncer snapshot to metrics, by column name: missing columns skip, unknown ones are ignored."""

from __future__ import annotations

from typing import Any

from .config import Settings
from .model import Metric, tag_value
from .pgbouncer import ADMIN_DB, PgbSnapshot

PREFIX = "django_db.pgbouncer."

POOL_GAUGES = (
    "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
    "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login",
)  # fmt: skip

# SHOW LISTS items (1.8 to 1.25); an item a later version adds is left out until it has a metadata row.
LIST_ITEMS = (
    "databases", "users", "pools", "free_clients", "used_clients", "login_clients",
    "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries", "dns_pending",
)  # fmt: skip

# metric: the columns that feed it, newest name first
DATABASE_GAUGES = {
    "pool_size": ("pool_size",),
    "reserve_pool_size": ("reserve_pool_size", "reserve_pool"),
    "max_connections": ("max_connections",),
    "current_connections": ("current_connections",),
    "paused": ("paused",),
    "disabled": ("disabled",),
}

# metric: (columns, newest first; divisor: microseconds to seconds)
STATS_RATES = {
    "transactions": (("total_xact_count",), 1),
    "queries": (("total_query_count", "total_requests"), 1),
    "bytes_received": (("total_received",), 1),
    "bytes_sent": (("total_sent",), 1),
    "xact_time": (("total_xact_time",), 1_000_000),
    "query_time": (("total_query_time",), 1_000_000),
    "wait_time": (("total_wait_time",), 1_000_000),
}


def number(value: Any) -> float | None:
    """A column value as a number; None for NULL or text that is not one."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def first_number(row: dict[str, Any], columns: tuple[str, ...]) -> float | None:
    for column in columns:
        if column in row:
            return number(row[column])
    return None


def pool_db(row: dict[str, Any]) -> str:
    return str(row.get("database") if "database" in row else row.get("name", ""))


def pool_sizes(snapshot: PgbSnapshot) -> dict[str, float]:
    """Each database's own pool size, where SHOW DATABASES gives one (-1 means the default)."""
    sizes = {}
    for row in snapshot.databases:
        size = number(row.get("pool_size"))
        if size is not None and size >= 0:
            sizes[str(row.get("name"))] = size
    return sizes


def pool_maxwait(row: dict[str, Any]) -> float | None:
    seconds = number(row.get("maxwait"))
    if seconds is None:
        return None
    return seconds + (number(row.get("maxwait_us")) or 0.0) / 1_000_000


def client_utilization(snapshot: PgbSnapshot) -> float | None:
    limit = number(snapshot.config.get("max_client_conn"))
    clients = snapshot.lists.get("used_clients")
    if not limit or clients is None:
        return None
    return clients / limit


def app_pools(snapshot: PgbSnapshot) -> list[dict[str, Any]]:
    return [row for row in snapshot.pools if pool_db(row) != ADMIN_DB]


def pgbouncer_metrics(snapshot: PgbSnapshot, settings: Settings) -> list[Metric]:
    assert settings.pgbouncer is not None
    base = (settings.pgbouncer.tag, *settings.tags)
    metrics: list[Metric] = []
    modes = {str(row.get("name")): row.get("pool_mode") for row in snapshot.databases}
    sizes = pool_sizes(snapshot)
    default_size = number(snapshot.config.get("default_pool_size"))
    default_mode = snapshot.config.get("pool_mode")

    for row in app_pools(snapshot):
        db = pool_db(row)
        mode = row.get("pool_mode") or modes.get(db) or default_mode or "unknown"
        tags = (*base, f"pgbouncer_db:{tag_value(db)}", f"user:{tag_value(str(row.get('user', '')))}",
                f"pool_mode:{tag_value(str(mode))}")  # fmt: skip
        for column in POOL_GAUGES:
            if column in row and (value := number(row[column])) is not None:
                metrics.append(Metric("gauge", f"{PREFIX}pools.{column}", value, tags))
        if (maxwait := pool_maxwait(row)) is not None:
            metrics.append(Metric("gauge", PREFIX + "pools.maxwait", maxwait, tags))
        size = sizes.get(db, default_size)
        active = number(row.get("sv_active"))
        if size and active is not None:
            metrics.append(Metric("gauge", PREFIX + "pools.server_utilization", active / size, tags))

    for row in snapshot.databases:
        db = str(row.get("name", ""))
        if db == ADMIN_DB:
            continue
        tags = (*base, f"pgbouncer_db:{tag_value(db)}")
        for metric, columns in DATABASE_GAUGES.items():
            if (value := first_number(row, columns)) is not None:
                metrics.append(Metric("gauge", f"{PREFIX}databases.{metric}", value, tags))

    for row in snapshot.stats:
        db = pool_db(row)
        if db == ADMIN_DB:
            continue
        tags = (*base, f"pgbouncer_db:{tag_value(db)}")
        for metric, (columns, divisor) in STATS_RATES.items():
            if (value := first_number(row, columns)) is not None:
                metrics.append(Metric("rate", f"{PREFIX}stats.{metric}", value / divisor, tags))

    if (limit := number(snapshot.config.get("max_client_conn"))) is not None:
        metrics.append(Metric("gauge", PREFIX + "max_client_conn", limit, base))
    if "used_clients" in snapshot.lists:
        metrics.append(Metric("gauge", PREFIX + "clients", snapshot.lists["used_clients"], base))
    if (utilization := client_utilization(snapshot)) is not None:
        metrics.append(Metric("gauge", PREFIX + "client_utilization", utilization, base))
    for item in LIST_ITEMS:
        if (value := snapshot.lists.get(item)) is not None:
            metrics.append(Metric("gauge", f"{PREFIX}lists.{item}", value, base))
    return metrics
