"""Each ``apps`` profile's connections against its budget, counted where the application makes them. No I/O.

An application that connects through PgBouncer holds PgBouncer's client connections: those are its
connections (in transaction mode PostgreSQL sees only the few server connections PgBouncer lends it for a
transaction). One that connects directly holds PostgreSQL backends. One that does both holds both. So a
profile counts its clients at PgBouncer (SHOW CLIENTS) and its backends at PostgreSQL that are its own:
not PgBouncer's server connections, which carry the name of the last client they served.
"""

from __future__ import annotations

from collections import Counter

from ..owners import counted_at_postgres
from ..records import PgbSnapshot, PgSnapshot
from ..settings import AppProfile, Settings, profile_for
from .groups import select
from .model import Finding, Metric, Status, Subject, tag_value

PREFIX = "django_db.app."
POSTGRES, PGBOUNCER = "postgres", "pgbouncer"


def counts(pg: PgSnapshot | None, pgb: PgbSnapshot | None, settings: Settings) -> dict[str, dict[str, Counter[str]]]:
    """Per profile, per place read this run (``postgres``, ``pgbouncer``), its connections by application_name."""
    found: dict[str, dict[str, Counter[str]]] = {profile.name: {} for profile in settings.apps}
    if not settings.apps:
        return found
    clients = pgb.clients if pgb is not None else None
    # A server connection a session-mode client holds is the application's: counted as that client at
    # PgBouncer where the clients were read, else at PostgreSQL. A pooler's own are nobody's.
    if pg is not None:
        for profile in settings.apps:
            found[profile.name][POSTGRES] = Counter()
        for group in select(pg.groups, settings):
            owner = profile_for(settings.apps, group.app)
            if owner is not None and counted_at_postgres(group.pooler, clients is not None):
                found[owner.name][POSTGRES][group.app] += group.count
    if clients is not None:
        for profile in settings.apps:
            found[profile.name][PGBOUNCER] = Counter()
        apps, dbs = settings.applications, settings.databases
        for client in clients.groups:
            owner = profile_for(settings.apps, client.app)
            if owner is not None and apps.allows(client.app) and dbs.allows(client.db):
                found[owner.name][PGBOUNCER][client.app] += client.connections
    return found


def _total(places: dict[str, Counter[str]]) -> int:
    return sum(sum(apps.values()) for apps in places.values())


def app_metrics(pg: PgSnapshot | None, pgb: PgbSnapshot | None, settings: Settings) -> list[Metric]:
    """``django_db.app.connections`` per profile and place (``counted_at:postgres``, ``counted_at:pgbouncer``; zero
    included), and ``budget_utilization`` over both where the profile has a budget and every configured side was
    read: a few series per profile, whatever the number of application names it matches."""
    server = settings.postgres or settings.pgbouncer
    assert server is not None
    endpoints = {POSTGRES: settings.postgres, PGBOUNCER: settings.pgbouncer}
    complete = (pg is not None or settings.postgres is None) and (pgb is not None or settings.pgbouncer is None)
    metrics = []
    by_profile = counts(pg, pgb, settings)
    for profile in settings.apps:
        app = f"app:{profile.name}"
        places = by_profile[profile.name]
        for place, apps in places.items():
            endpoint = endpoints[place]
            assert endpoint is not None
            tags = (endpoint.tag, *settings.tags, app, f"counted_at:{place}")
            metrics.append(Metric("gauge", PREFIX + "connections", sum(apps.values()), tags))
        if profile.max_connections is not None and complete and places:
            ratio = _total(places) / profile.max_connections
            metrics.append(Metric("gauge", PREFIX + "budget_utilization", ratio, (server.tag, *settings.tags, app)))
    return metrics


def budget_findings(pg: PgSnapshot | None, pgb: PgbSnapshot | None, settings: Settings) -> list[Finding]:
    """A finding per application over its budget: WARNING, CRITICAL from twice the budget. Where it connects
    through PgBouncer, the message says how many of its connections are PgBouncer's clients."""
    findings = []
    by_profile = counts(pg, pgb, settings)
    for profile in settings.apps:
        places = by_profile[profile.name]
        count, budget = _total(places), profile.max_connections
        if budget is None or count <= budget:
            continue
        findings.append(_over_budget(profile, places, count, budget))
    return findings


def _over_budget(profile: AppProfile, places: dict[str, Counter[str]], count: int, budget: int) -> Finding:
    apps: Counter[str] = Counter()
    for counted in places.values():
        apps.update(counted)
    names = (
        ""
        if set(apps) == {profile.name}
        else " (" + ", ".join(f"{a or 'none'} {n}" for a, n in apps.most_common(3)) + ")"
    )
    at_pgbouncer = sum(places.get(PGBOUNCER, Counter()).values())
    where = ""
    if at_pgbouncer:
        direct = sum(places.get(POSTGRES, Counter()).values())
        where = f", {at_pgbouncer} of them client connections at PgBouncer" + (
            f" and {direct} straight to PostgreSQL" if direct else ""
        )
    status = Status.CRITICAL if count >= 2 * budget else Status.WARNING
    return Finding(
        "over_budget",
        status,
        f"app={profile.name} holds {count} connections{names}, over its budget of {budget}{where}",
        "more processes or threads than planned, or connections kept outside requests; "
        "find them, or raise the profile's max_connections if the plan changed",
        (Subject((f"app:{tag_value(profile.name)}",), count),),
        count,
        budget if status == Status.WARNING else 2 * budget,
    )
