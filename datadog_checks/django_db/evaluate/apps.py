"""Per-application profiles over a PostgreSQL snapshot: connections against budgets. No I/O."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from ..owners import is_applications
from ..records import PgSnapshot
from ..settings import AppProfile, Settings, profile_for
from .groups import select

PREFIX = "django_db.app."


def connections_by_profile(snapshot: PgSnapshot, settings: Settings) -> dict[str, Counter[str]]:
    """Per profile name, its connections by application_name: what the application holds, not PgBouncer's own
    server connections (which carry the name of the last client PgBouncer lent them to)."""
    found: dict[str, Counter[str]] = {profile.name: Counter() for profile in settings.apps}
    if not settings.apps:
        return found
    for group in select(snapshot.groups, settings):
        if not is_applications(group.pooler):
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
            group = group._replace(leaked=0)
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
