"""PostgreSQL records to metrics: filtering, folding and the figures. No I/O."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from ..config import Settings
from ..records import ActivityGroup, PgSnapshot
from .churn import Churn, ChurnWindow, Sample
from .model import Metric, tag_value

PREFIX = "django_db.postgres."
OTHER = "other"

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


def select(groups: Iterable[ActivityGroup], settings: Settings) -> list[ActivityGroup]:
    """The groups the user asked to see, by application and database name."""
    return [g for g in groups if settings.applications.allows(g.app) and settings.databases.allows(g.db)]


def fold(
    groups: list[ActivityGroup], dimensions: Iterable[str], limit: int
) -> tuple[list[ActivityGroup], dict[str, list[str]]]:
    """Keep the ``limit`` largest values of each dimension; the rest become ``other``.

    Returns the groups with folded values and, per dimension, the values folded away.
    """
    folded: dict[str, list[str]] = {}
    for dimension in dimensions:
        sizes: Counter[str] = Counter()
        for group in groups:
            sizes[getattr(group, dimension)] += group.count
        if len(sizes) <= limit:
            continue
        ranked = sorted(sizes, key=lambda value: (-sizes[value], value))
        kept = set(ranked[:limit])
        folded[dimension] = sorted(ranked[limit:])
        groups = [
            g if getattr(g, dimension) in kept else replace(g, **{dimension: OTHER})  # type: ignore[arg-type]
            for g in groups
        ]
    return groups, folded


def _tags(group: ActivityGroup, dimensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(f"{d}:{tag_value(getattr(group, d))}" for d in dimensions)


def client_backends(snapshot: PgSnapshot) -> int:
    """Every client backend; the groups leave out the check's own and those on template databases,
    which take a slot all the same."""
    return sum(g.count for g in snapshot.groups) + snapshot.template_backends + 1


def utilization(snapshot: PgSnapshot) -> float:
    usable = snapshot.settings.usable_slots
    used = client_backends(snapshot)
    return used / usable if usable else 1.0


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

    def churn(self, snapshot: PgSnapshot, opened_by_app: Mapping[str, Mapping[str, float]]) -> Churn | None:
        """Connections opened and closed again over at least a minute of runs (None until then), with what
        each application opened by source (``log``, ``django``; backends seen started since the previous run
        are added as ``sampled``)."""
        connections: Counter[str] = Counter()
        sampled: Counter[str] = Counter()
        for group in snapshot.groups:
            connections[group.app] += group.count
            sampled[group.app] += group.opened
        sources = {**opened_by_app, "sampled": +sampled}
        sample = Sample(snapshot.server_time, self.opened_total, sum(connections.values()), connections, sources)
        return self.window.add(sample)


def postgres_metrics(
    snapshot: PgSnapshot, settings: Settings, opened_by_db: dict[str, int]
) -> tuple[list[Metric], dict[str, list[str]]]:
    """The PostgreSQL metrics of one snapshot, and the values folded into ``other``."""
    assert settings.postgres is not None
    base = (settings.postgres.tag, *settings.tags)
    server = snapshot.settings
    metrics: list[Metric] = []

    def gauge(name: str, value: float, tags: tuple[str, ...] = ()) -> None:
        metrics.append(Metric("gauge", PREFIX + name, value, base + tags))

    used = client_backends(snapshot)
    gauge("max_connections", server.max_connections)
    gauge("reserved_connections", server.reserved_slots)
    gauge("connections_available", max(0, server.usable_slots - used))
    gauge("connection_utilization", utilization(snapshot))

    groups, folded = fold(
        select(snapshot.groups, settings), ("db", "user", "app", "client_addr"), settings.max_tag_values
    )
    usage = "connections_usage" in settings.extra_metrics

    sums: dict[tuple[str, ...], float] = defaultdict(float)
    for g in groups:
        sums[("connections", f"state:{state_tag(g.state)}", *_tags(g, settings.group_by))] += g.count
        sums[("leaked_connections", *_tags(g, ("db", "user", "app")))] += g.leaked
        sums[("waiting_on_lock", *_tags(g, ("db", "app")))] += g.waiting_on_lock
        in_use = "idle" if g.state == "idle" else "used"
        if usage:
            sums[("usage", f"state:{in_use}", *_tags(g, ("db", "app")))] += g.count
        sums[("otel", f"state:{in_use}", f"pool.name:{settings.postgres.server_tag}/{tag_value(g.db)}")] += g.count
    for (name, *tags), value in sums.items():
        if name == "usage":
            metrics.append(Metric("gauge", "django_db.connections.usage", value, base + tuple(tags)))
        elif name == "otel":
            if settings.emit_otel_metrics:
                metrics.append(Metric("gauge", "db.client.connections.usage", value, base + tuple(tags)))
        else:
            gauge(name, value, tuple(tags))

    ages: dict[tuple[str, ...], float] = {}
    for g in groups:
        key = _tags(g, ("db", "app"))
        for state, name in (("idle", "idle.max_age"), ("idle in transaction", "idle_in_transaction.max_age"),
                            ("active", "active.max_duration")):  # fmt: skip
            age = g.max_age if g.state == state else 0.0
            ages[(name, *key)] = max(ages.get((name, *key), 0.0), age)
    for (name, *tags), value in ages.items():
        gauge(name, value, tuple(tags))

    for db, opened in opened_by_db.items():
        if settings.databases.allows(db):
            db_tags = (*base, f"db:{tag_value(db)}")
            metrics.append(Metric("monotonic_count", PREFIX + "sessions.opened", opened, db_tags))
    for d in snapshot.databases or ():
        if settings.databases.allows(d.db):
            db_tags = (*base, f"db:{tag_value(d.db)}")
            for name, value in (("abandoned", d.abandoned), ("fatal", d.fatal), ("killed", d.killed)):
                metrics.append(Metric("monotonic_count", PREFIX + "sessions." + name, value, db_tags))
    return metrics, folded
