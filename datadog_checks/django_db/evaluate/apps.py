"""Per-application profiles over a PostgreSQL snapshot: connections against budgets. No I/O."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from ..config import Settings
from ..profiles import AppProfile, profile_for
from ..records import POOLER_OWN, PgSnapshot
from .model import Finding, Metric, Status
from .postgres import select

PREFIX = "django_db.app."


def connections_by_profile(snapshot: PgSnapshot, settings: Settings) -> dict[str, Counter[str]]:
    """Per profile name, its connections by application_name: what the application holds, not PgBouncer's own
    server connections (which carry the name of the last client PgBouncer lent them to)."""
    found: dict[str, Counter[str]] = {profile.name: Counter() for profile in settings.apps}
    if not settings.apps:
        return found
    for group in select(snapshot.groups, settings):
        if group.pooler == POOLER_OWN:
            continue
        profile = profile_for(settings.apps, group.app)
        if profile is not None:
            found[profile.name][group.app] += group.count
    return found


def within_budget(profile: AppProfile, connections: int) -> bool:
    return profile.max_connections is None or connections <= profile.max_connections


def excuse_pools(snapshot: PgSnapshot, settings: Settings) -> PgSnapshot:
    """The snapshot with the idle connections of pooled applications within their budget not counted as leaked:
    a client-side pool keeps idle connections on purpose."""
    if not any(profile.pooled for profile in settings.apps):
        return snapshot
    totals = {name: sum(apps.values()) for name, apps in connections_by_profile(snapshot, settings).items()}
    groups = []
    for group in snapshot.groups:
        profile = profile_for(settings.apps, group.app)
        if group.leaked and profile is not None and profile.pooled and within_budget(profile, totals[profile.name]):
            group = replace(group, leaked=0)
        groups.append(group)
    suspects = tuple(
        s
        for s in snapshot.leak_suspects
        if not (
            (profile := profile_for(settings.apps, s.app)) is not None
            and profile.pooled
            and within_budget(profile, totals[profile.name])
        )
    )
    return replace(snapshot, groups=tuple(groups), leak_suspects=suspects)


def app_metrics(snapshot: PgSnapshot, settings: Settings) -> list[Metric]:
    """``django_db.app.connections`` for every profile (zero included), and ``budget_utilization`` where it has
    a budget: one series each per profile, whatever the number of application names it matches."""
    assert settings.postgres is not None
    base = (settings.postgres.tag, *settings.tags)
    metrics = []
    by_profile = connections_by_profile(snapshot, settings)
    for profile in settings.apps:
        tags = (*base, f"app:{profile.name}")
        count = sum(by_profile[profile.name].values())
        metrics.append(Metric("gauge", PREFIX + "connections", count, tags))
        if profile.max_connections is not None:
            metrics.append(Metric("gauge", PREFIX + "budget_utilization", count / profile.max_connections, tags))
    return metrics


def budget_findings(snapshot: PgSnapshot, settings: Settings) -> list[Finding]:
    """A finding per application over its budget: WARNING, CRITICAL from twice the budget."""
    findings = []
    by_profile = connections_by_profile(snapshot, settings)
    for profile in settings.apps:
        budget = profile.max_connections
        apps = by_profile[profile.name]
        count = sum(apps.values())
        if budget is None or count <= budget:
            continue
        status = Status.CRITICAL if count >= 2 * budget else Status.WARNING
        names = (
            ""
            if set(apps) == {profile.name}
            else " (" + ", ".join(f"{a or 'none'} {n}" for a, n in apps.most_common(3)) + ")"
        )
        findings.append(
            Finding(
                status,
                f"app={profile.name} holds {count} connections{names}, over its budget of {budget}: "
                "more processes or threads than planned, or connections kept outside requests; "
                "find them, or raise the profile's max_connections if the plan changed",
            )
        )
    return findings
