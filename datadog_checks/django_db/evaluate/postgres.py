"""PostgreSQL records to metrics: filtering, folding and the figures. No I/O."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from ..owners import is_direct, opener, pooler_tags
from ..quiet import is_monitoring
from ..records import DIRECT, DatabaseSessions, PgSnapshot
from ..settings import Settings
from .churn import Churn, ChurnWindow, Sample
from .groups import fold, ratio, select
from .model import Metric, tag_value
from .otel import pool_metrics, server_pools

PREFIX = "django_db.postgres."
LEAKED = PREFIX + "leaked_connections"

# pg_stat_activity's state names as tag values.
STATE_TAGS = {
    "active": "active",
    "idle": "idle",
    "idle in transaction": "idle_in_transaction",
    "idle in transaction (aborted)": "idle_in_transaction_aborted",
    "fastpath function call": "fastpath_function_call",
    "disabled": "disabled",
    "starting": "starting",  # not yet ready for its first query; PostgreSQL 18 says so, older ones leave it NULL
    None: "unknown",  # hidden from the monitoring role
}


def state_tag(state: str | None) -> str:
    return STATE_TAGS.get(state) or str(state).replace(" ", "_").replace("(", "").replace(")", "")


def client_backends(snapshot: PgSnapshot) -> int:
    """Every client backend; the groups leave out the check's own and those on template databases,
    which take a slot all the same."""
    return sum(g.count for g in snapshot.groups) + snapshot.template_backends + 1


@dataclass
class SessionHistory:
    """Opened sessions over runs: the cumulative count below PostgreSQL 14, and churn over a window of runs."""

    legacy_opened: Counter[str] = field(default_factory=Counter)
    window: ChurnWindow = field(default_factory=ChurnWindow)
    opened_total: int = 0  # sessions opened so far on every database, as the last opened_by_db counted them

    def opened_by_db(self, snapshot: PgSnapshot) -> dict[str, int]:
        if snapshot.databases is not None:
            found = {d.db: d.opened for d in snapshot.databases}
        else:
            for group in snapshot.groups:
                self.legacy_opened[group.db] += group.opened
            found = dict(self.legacy_opened)
        self.opened_total = sum(found.values())
        return found

    def churn(
        self,
        snapshot: PgSnapshot,
        opened_by_app: Mapping[str, Mapping[str, float]],
        reasons: Mapping[str, float] | None = None,
    ) -> Churn | None:
        """Connections opened and closed again over at least a minute of runs (None until then), with what
        each application opened by source (``log``, ``django``, ``pgbouncer_log``; backends seen started since
        the previous run are added as ``sampled``). PgBouncer's server connections count as PgBouncer's
        (``owners.opener``), whatever name its last client gave them; ``reasons``: why PgBouncer closed its servers."""
        connections: dict[str, int] = {}
        sampled: dict[str, int] = {}
        for group in snapshot.groups:
            who = opener(group.pooler, group.app)
            connections[who] = connections.get(who, 0) + group.count
            if group.opened:
                sampled[who] = sampled.get(who, 0) + group.opened
        sources = {**opened_by_app, "sampled": sampled}
        sample = Sample(
            snapshot.server_time, self.opened_total, sum(connections.values()), connections, sources, reasons or {}
        )
        return self.window.add(sample)


# The gauges each group adds to, by the state it is in: its (metric name, tags) for
# connections, leaked_connections, waiting_on_lock, the opt-in usage, the OpenTelemetry usage,
# and the three ages. Made once per group and kept across runs: the same few groups come back
# run after run.
@lru_cache(maxsize=4096)
def _series(
    base: tuple[str, ...], group_by: tuple[str, ...], server_tag: str,
    state: str | None, db: str, user: str, app: str, client_addr: str, pooler: int = DIRECT,
) -> tuple[tuple[str, tuple[str, ...]], ...]:  # fmt: skip
    named = {"db": db, "user": user, "app": app, "client_addr": client_addr}
    tags = {dimension: f"{dimension}:{tag_value(value)}" for dimension, value in named.items()}
    by = tuple(tags[dimension] for dimension in group_by)
    db_app = (tags["db"], tags["app"])
    in_use = "state:idle" if state == "idle" else "state:used"
    # PgBouncer's server connections keep the app tag PgBouncer's last client gave them, and say whose they are.
    pooled = pooler_tags(pooler)
    return (
        (PREFIX + "connections", (*base, f"state:{state_tag(state)}", *by, *pooled)),
        (LEAKED, (*base, tags["db"], tags["user"], tags["app"])),
        (PREFIX + "waiting_on_lock", (*base, *db_app)),
        ("django_db.connections.usage", (*base, in_use, *db_app)),
        ("db.client.connections.usage", (*base, in_use, f"pool.name:{server_tag}/{tag_value(db)}")),
        (PREFIX + "idle.max_age", (*base, *db_app)),
        (PREFIX + "idle_in_transaction.max_age", (*base, *db_app)),
        (PREFIX + "active.max_duration", (*base, *db_app)),
    )


# The states whose oldest age is a figure: the position of its series in what _series gives.
AGED: dict[str | None, int] = {"idle": 5, "idle in transaction": 6, "active": 7}


@lru_cache(maxsize=1024)
def _db_tags(base: tuple[str, ...], db: str) -> tuple[str, ...]:
    return (*base, f"db:{tag_value(db)}")


SESSIONS_OPENED = PREFIX + "sessions.opened"
SESSION_ENDS = tuple((f"{PREFIX}sessions.{name}", name) for name in ("abandoned", "fatal", "killed"))


def postgres_metrics(
    snapshot: PgSnapshot, settings: Settings, opened_by_db: dict[str, int], leaks_judged: bool = True
) -> tuple[list[Metric], dict[str, list[str]]]:
    """The PostgreSQL metrics of one snapshot, and the values folded into ``other``. ``leaks_judged``: False while
    a PgBouncer's server connections cannot be told from the applications' (no leaked_connections then)."""
    assert settings.postgres is not None
    base = (settings.postgres.tag, *settings.tags)
    server = snapshot.settings

    used = client_backends(snapshot)
    usable = server.usable_slots
    metrics = [
        Metric("gauge", PREFIX + "max_connections", server.max_connections, base),
        Metric("gauge", PREFIX + "reserved_connections", server.reserved_slots, base),
        Metric("gauge", PREFIX + "connections_available", max(0, usable - used), base),
        Metric("gauge", PREFIX + "connection_utilization", ratio(used, usable), base),
    ]

    groups, folded = fold(
        select(snapshot.groups, settings), ("db", "user", "app", "client_addr"), settings.max_tag_values
    )
    usage = "connections_usage" in settings.extra_metrics
    otel, current = settings.otel_legacy, settings.otel_current
    group_by, server_tag = settings.group_by, settings.postgres.server_tag
    pools: dict[str, tuple[float, float]] = {}  # (used, idle) by database, for the current OpenTelemetry names

    # The figures zero on a healthy stack (a leak, a lock wait, an age) are added only where not zero: sparse.py
    # sends the 0 that ends a series by itself, and a run with none of them makes none. A monitoring session (this
    # check's other instances, Datadog's postgres check) is counted among the connections but has no age figure:
    # it idles between its runs, its query is the monitor's own.
    sums: dict[tuple[str, tuple[str, ...]], float] = {}
    ages: dict[tuple[str, tuple[str, ...]], float] = {}
    for state, db, user, app, client_addr, count, waiting, leaked, max_age, _, pooler, _ in groups:
        series = _series(base, group_by, server_tag, state, db, user, app, client_addr, pooler)
        connections, leaks, locks, in_use, otel_use, _, _, _ = series
        sums[connections] = sums.get(connections, 0.0) + count
        if leaked and leaks_judged:
            sums[leaks] = sums.get(leaks, 0.0) + leaked
        if waiting:
            sums[locks] = sums.get(locks, 0.0) + waiting
        if usage:
            sums[in_use] = sums.get(in_use, 0.0) + count
        if otel:
            sums[otel_use] = sums.get(otel_use, 0.0) + count
        if current and is_direct(pooler):
            in_pool, idle_in_pool = pools.get(tag_value(db), (0.0, 0.0))
            if state == "idle":
                pools[tag_value(db)] = (in_pool, idle_in_pool + count)
            else:
                pools[tag_value(db)] = (in_pool + count, idle_in_pool)
        aged = AGED.get(state)
        if aged is not None and max_age > 0 and not is_monitoring(app):  # a monitor's: its run interval, no news
            key = series[aged]
            ages[key] = max(ages.get(key, 0.0), max_age)
    metrics += [Metric("gauge", name, value, tags) for (name, tags), value in sums.items()]
    metrics += [Metric("gauge", name, value, tags) for (name, tags), value in ages.items()]
    if current:
        metrics += pool_metrics(server_pools(server_tag, pools, usable), base)

    allows = settings.databases.allows
    for db, opened in opened_by_db.items():
        if allows(db):
            metrics.append(_opened(base, db, opened))
    for d in snapshot.databases or ():
        if allows(d.db):
            metrics += _session_ends(base, d)
    return metrics, folded


# The counters of a database's sessions, made once per value: they move only as sessions open and end.
@lru_cache(maxsize=1024)
def _opened(base: tuple[str, ...], db: str, opened: int) -> Metric:
    return Metric("monotonic_count", SESSIONS_OPENED, opened, _db_tags(base, db))


@lru_cache(maxsize=1024)
def _session_ends(base: tuple[str, ...], sessions: DatabaseSessions) -> tuple[Metric, ...]:
    tags = _db_tags(base, sessions.db)
    return tuple(Metric("monotonic_count", name, getattr(sessions, field), tags) for name, field in SESSION_ENDS)
