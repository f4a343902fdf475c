"""PgBouncer's clients (SHOW CLIENTS) by application and host: metrics, leaks, who holds the client slots and
who waits. No I/O.

State: PgBouncer 1.25 on says `idle` for a client between requests; before, such a client shows as
`active` with no server linked, and is called `idle` here too, so the series keep their meaning across an
upgrade. In session mode a client keeps its server linked between requests and stays `active`.

Idle time is PgBouncer's own clock against itself: the console's SHOW CLIENTS is the newest request of
all, so the newest request_time is "now", and a client's idle time is now minus its request_time (whole
seconds, as PgBouncer writes them). A client linked to a server in transaction or statement mode is inside
a transaction, not idle: PostgreSQL's own findings cover it.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from datetime import datetime
from functools import lru_cache
from typing import NamedTuple

from ..quiet import LastUse, is_monitoring, may_be_quiet
from ..records import PgbClientGroup, PgbClients, PgbSnapshot, Quiet
from ..settings import Settings, profile_for
from .groups import OTHER, ranked
from .model import Finding, Metric, app_subjects, crossed, fold_subjects, level, tag_value

PREFIX = "django_db.pgbouncer."
EPOCH = datetime(1970, 1, 1)  # PgBouncer's times are compared with each other only
SHOWN = 3  # applications or hosts a message names; the rest are counted
# group_by's dimensions and the client fields and tags they mean on PgBouncer's side
DIMENSIONS = {"db": ("db", "pgbouncer_db"), "user": ("user", "user"), "app": ("app", "app"),
              "client_addr": ("addr", "client_addr")}  # fmt: skip


class Clients(NamedTuple):
    """Clients alike in database, user, application, state and host, with those leaked among them."""

    db: str
    user: str
    app: str
    state: str  # active, waiting or idle (see the module's text)
    addr: str
    connections: int
    leaked: int = 0
    leaked_linked: int = 0  # leaked and pinning a server connection (session mode)
    longest_idle: float = 0.0  # seconds, of the leaked


@lru_cache(maxsize=8192)
def seconds(text: str) -> float | None:
    """A PgBouncer timestamp (``2026-12-04 23:58:30 UTC``) in seconds on its own clock; None if it is none."""
    try:
        return (datetime.fromisoformat(text[:19]) - EPOCH).total_seconds()
    except ValueError:
        return None


def state_of(group: PgbClientGroup) -> str:
    if group.state == "active" and not group.linked:
        return "idle"
    return group.state or "unknown"


def pool_modes(snapshot: PgbSnapshot, pairs: Collection[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """The pool mode of the pools (database, user) asked for: one pass over SHOW POOLS, and none when no pool
    is asked for, as in a run without a leak."""
    if not pairs:
        return {}
    return {(pool.db, pool.user): pool.pool_mode for pool in snapshot.pools if (pool.db, pool.user) in pairs}


def resolve(snapshot: PgbSnapshot, settings: Settings, last_use: LastUse | None = None) -> list[Clients]:
    """The clients the user asked to see (``applications``, ``databases``), their leaks found: those idle longer
    than their application's leak threshold plus the time it has been quiet where the runs saw its last use
    (``last_use``, quiet.py), but for a ``pooled`` profile's within its budget and a monitoring session's."""
    return resolve_quiet(snapshot, settings, last_use)[0]


def resolve_quiet(
    snapshot: PgbSnapshot, settings: Settings, last_use: LastUse | None = None
) -> tuple[list[Clients], tuple[Quiet, ...]]:
    """As ``resolve``, and the quiet applications whose clients idle past their threshold are kept, no leak."""
    clients = snapshot.clients
    if clients is None:
        return [], ()
    now = seconds(clients.now)
    modes: dict[tuple[str, str], str] | None = None  # read only when a linked client is idle past its threshold
    apps, dbs = settings.applications, settings.databases
    if apps.everything and dbs.everything:
        chosen: Iterable[PgbClientGroup] = clients.groups
    else:
        chosen = [g for g in clients.groups if apps.allows(g.app) and dbs.allows(g.db)]
    limit = _leak_limits(chosen, settings)
    merged: dict[tuple[str, str, str, str, str], list[float]] = {}
    idle_past: list[tuple[PgbClientGroup, list[float], float, float]] = []  # past its threshold
    used: dict[str, float] = {}  # each application's youngest idle time, 0 while a client is in use
    held: Counter[str] = Counter()
    for g in chosen:
        key = (g.db, g.user, g.app, state_of(g), g.addr)
        into = merged.get(key)
        if into is None:
            into = merged[key] = [0, 0, 0, 0.0]
        into[0] += g.connections
        held[g.app] += g.connections
        idle = None if now is None or g.state == "waiting" else now - (seconds(g.request_time) or now)
        threshold = limit(g.app)
        in_use = idle is None
        if not in_use and g.linked:
            if modes is None:
                modes = pool_modes(snapshot, {(c.db, c.user) for c in chosen if c.linked})
            in_use = modes.get((g.db, g.user), "session") != "session"  # inside a transaction
        used[g.app] = min(used.get(g.app, math.inf), 0.0 if in_use or idle is None else max(0.0, idle))
        if in_use or idle is None or threshold is None or idle <= threshold:
            continue
        idle_past.append((g, into, idle, threshold))
    quiet = last_use.quiet(used, limit, now) if last_use is not None and now is not None else {}
    quiet = {app: age for app, age in quiet.items() if may_be_quiet(settings.apps, app, held[app])}
    leaking: set[str] = set()
    for g, into, idle, threshold in idle_past:
        if idle <= threshold + quiet.get(g.app, 0.0):
            continue  # idle only since its application went quiet
        leaking.add(g.app)
        into[1] += g.connections
        into[2] += g.connections if g.linked else 0
        into[3] = max(into[3], idle)
    kept = tuple(
        Quiet(app, quiet[app], held[app]) for app in sorted({g.app for g, *_ in idle_past} - leaking) if app in quiet
    )
    rows = [Clients(*key, int(c), int(leaked), int(linked), idle) for key, (c, leaked, linked, idle) in merged.items()]
    return rows, kept


def _leak_limits(groups: Iterable[PgbClientGroup], settings: Settings) -> Callable[[str], float | None]:
    """Each application's leak threshold; None for a pooled profile within its budget at PgBouncer."""
    excused: set[str] = set()
    pooled = [p for p in settings.apps if p.pooled]
    if pooled:
        held: Counter[str] = Counter()
        for g in groups:
            profile = profile_for(settings.apps, g.app)
            if profile is not None and profile.pooled:
                held[profile.name] += g.connections
        excused = {p.name for p in pooled if p.max_connections is None or held[p.name] <= p.max_connections}
    made: dict[str, float | None] = {}

    def limit(app: str) -> float | None:
        if app not in made:
            profile = profile_for(settings.apps, app)
            if is_monitoring(app):
                made[app] = None
            elif profile is None:
                made[app] = settings.leak_idle_seconds
            else:
                made[app] = None if profile.name in excused else profile.leak_idle_seconds
        return made[app]

    return limit


# -- metrics ------------------------------------------------------------------------------------------
def kept_values(rows: list[Clients], limit: int) -> tuple[dict[str, set[str] | None], dict[str, list[str]]]:
    """Per field, the ``limit`` values with the most clients (None when all fit), and per tag the values folded
    into ``other``: database, user, application and host are all chosen by clients."""
    kept: dict[str, set[str] | None] = {}
    folded: dict[str, list[str]] = {}
    for field, tag in DIMENSIONS.values():
        sizes: Counter[str] = Counter()
        for row in rows:
            sizes[getattr(row, field)] += row.connections
        if len(sizes) <= limit:
            kept[field] = None
            continue
        ranked = sorted(sizes, key=lambda value: (-sizes[value], value))
        kept[field] = set(ranked[:limit])
        folded[tag] = sorted(ranked[limit:])
    return kept, folded


def client_metrics(rows: list[Clients], settings: Settings) -> tuple[list[Metric], dict[str, list[str]]]:
    """``client_connections`` by state and the ``group_by`` dimensions (``db`` is ``pgbouncer_db``, ``client_addr``
    the client's host), and ``leaked_clients`` by pgbouncer_db, user, app (zero included); values folded away.
    Rows are summed under their folded values first: tags are made once per series, not per row."""
    assert settings.pgbouncer is not None
    base = (settings.pgbouncer.tag, *settings.tags)
    kept, folded = kept_values(rows, settings.max_tag_values)
    fields = [field for field, _ in DIMENSIONS.values()]  # db, user, app, addr
    by = [DIMENSIONS[d] for d in settings.group_by if d in DIMENSIONS]
    chosen = [fields.index(field) for field, _ in by]
    connections: dict[tuple[str, ...], int] = defaultdict(int)
    leaked: dict[tuple[str, ...], int] = defaultdict(int)
    keeps = [kept[field] for field in fields]
    for r in rows:
        values = tuple(
            value if keep is None or value in keep else OTHER
            for value, keep in zip((r.db, r.user, r.app, r.addr), keeps, strict=True)
        )
        leaked[values[:3]] += r.leaked
        connections[(r.state, *(values[i] for i in chosen))] += r.connections
    names = ("state", *(name for _, name in by))
    metrics = [
        Metric("gauge", PREFIX + "client_connections", n, (*base, *_tags(names, key))) for key, n in connections.items()
    ]
    metrics += [
        Metric("gauge", PREFIX + "leaked_clients", n, (*base, *_tags(("pgbouncer_db", "user", "app"), key)))
        for key, n in leaked.items()
    ]
    return metrics, folded


def _tags(names: Iterable[str], values: Iterable[str]) -> tuple[str, ...]:
    return tuple(f"{name}:{tag_value(value)}" for name, value in zip(names, values, strict=True))


# -- findings -----------------------------------------------------------------------------------------
def _app(name: str) -> str:
    return f"app={name or 'none'}"


def _ranked(counts: Counter[str], shown: int = SHOWN) -> list[tuple[str, int]]:
    return ranked(counts)[:shown]


def _hosts(counts: Counter[str], unit: str = "") -> str:
    listed = ", ".join(f"{host or 'a Unix socket'} {n}" for host, n in _ranked(counts))
    more = len(counts) - SHOWN
    return listed + (f" and {more} more hosts" if more > 0 else "") + unit


def _by_app(clients: PgbClients | None) -> Counter[str]:
    by_app: Counter[str] = Counter()
    for g in clients.groups if clients is not None else ():
        by_app[g.app] += g.connections
    return by_app


def top_holders(clients: PgbClients | None, shown: int = SHOWN) -> dict[str, int]:
    """The applications holding most of PgBouncer's client slots, with their clients."""
    return dict(_ranked(_by_app(clients), shown))


def holders(clients: PgbClients | None, shown: int = SHOWN) -> str:
    """Who holds PgBouncer's client slots: ``app=web 60 (from 10.0.0.7 40, 10.0.0.8 20), app=report 30 (...)``;
    every client counted, whatever the filters, since the slots are shared. Empty without SHOW CLIENTS."""
    if clients is None or not clients.groups:
        return ""
    by_app = _by_app(clients)
    ranked = _ranked(by_app, shown)
    hosts: dict[str, Counter[str]] = {app: Counter() for app, _ in ranked}
    for g in clients.groups:
        if g.app in hosts:
            hosts[g.app][g.addr] += g.connections
    shown_apps = [f"{_app(app)} {n} (from {_hosts(hosts[app])})" for app, n in ranked]
    more = len(by_app) - shown
    return ", ".join(shown_apps) + (f" and {more} more applications" if more > 0 else "")


def waiting_apps(clients: PgbClients | None, db: str, user: str) -> str:
    """The applications whose clients wait at one pool: ``app=web 5, app=api 2``; empty if none is known."""
    if clients is None:
        return ""
    waiting: Counter[str] = Counter()
    for g in clients.groups:
        if g.state == "waiting" and g.db == db and g.user == user:
            waiting[g.app] += g.connections
    listed = ", ".join(f"{_app(app)} {n}" for app, n in _ranked(waiting))
    more = len(waiting) - SHOWN
    return listed + (f" and {more} more applications" if more > 0 else "")


class _Leak(NamedTuple):
    total: int
    linked: int
    longest: float
    hosts: Counter[str]
    pools: Counter[str]  # "db/user mode"
    modes: set[str]


def _leaks(rows: Iterable[Clients], modes: dict[tuple[str, str], str]) -> dict[str, _Leak]:
    found: dict[str, _Leak] = {}
    for r in rows:
        if not r.leaked:
            continue
        leak = found.get(r.app)
        if leak is None:
            leak = found[r.app] = _Leak(0, 0, 0.0, Counter(), Counter(), set())
        mode = modes.get((r.db, r.user), "unknown")
        leak.hosts[r.addr] += r.leaked
        leak.pools[f"{r.db}/{r.user}"] += r.leaked
        leak.modes.add(mode)
        found[r.app] = leak._replace(
            total=leak.total + r.leaked, linked=leak.linked + r.leaked_linked, longest=max(leak.longest, r.longest_idle)
        )
    return found


def leak_findings(rows: list[Clients], snapshot: PgbSnapshot, settings: Settings) -> list[Finding]:
    """One finding per application whose clients sit idle at PgBouncer past its leak threshold, the most first;
    past ``SHOWN`` applications, one more for the rest. Their subjects name at most ``max_tag_values``
    applications in all, the rest as ``other``: a flood of leaking names never grows django_db.finding."""
    leaks = _leaks(rows, pool_modes(snapshot, {(r.db, r.user) for r in rows if r.leaked}))
    ranked = sorted(leaks.items(), key=lambda item: (-item[1].total, item[0]))
    shown = min(SHOWN, settings.max_tag_values)
    findings = [_leak_finding(app, leak, snapshot, settings) for app, leak in ranked[:shown]]
    rest = ranked[shown:]
    if rest:
        total = sum(leak.total for _, leak in rest)
        most = max(leak.total for _, leak in rest)
        status = level(most, settings.thresholds.leaked_connections)
        findings.append(
            Finding(
                "leaked_clients",
                status,
                f"{total} more client connections of {len(rest)} more applications held at PgBouncer idle past "
                f"their leak threshold: " + ", ".join(f"{_app(app)} {leak.total}" for app, leak in rest[:SHOWN]),
                subjects=fold_subjects(
                    app_subjects({app: leak.total for app, leak in rest}), settings.max_tag_values - shown
                ),
                figure=total,
                threshold=crossed(settings.thresholds.leaked_connections, status),
            )
        )
    return findings


def _leak_finding(app: str, leak: _Leak, snapshot: PgbSnapshot, settings: Settings) -> Finding:
    profile = profile_for(settings.apps, app)
    threshold = profile.leak_idle_seconds if profile is not None else settings.leak_idle_seconds
    conn_max_age = profile.conn_max_age if profile is not None else settings.conn_max_age
    n = leak.total
    pools = ", ".join(f"{pool} {count}" for pool, count in _ranked(leak.pools))
    text = (
        f"{n} client connection{'s' if n != 1 else ''} of {_app(app)} held at PgBouncer idle for over "
        f"{threshold:g} s (leaked, the longest for {leak.longest:.0f} s) from {_hosts(leak.hosts)} "
        f"on pool{'s' if len(leak.pools) > 1 else ''} {pools}"
    )
    limit = snapshot.config.max_client_conn
    slots = f"{n} of max_client_conn={limit:g}" if limit else f"{n}"
    if leak.linked == 0:
        text += f": in {'/'.join(sorted(leak.modes))} mode they pin no server connection, but take {slots} client slots"
    elif leak.linked == n:
        text += f": in session mode each also pins a server connection ({n} at PostgreSQL) and takes a client slot"
    else:
        text += f": {leak.linked} of them, in session mode, also pin a server connection each; all take client slots"
    status = level(n, settings.thresholds.leaked_connections)
    return Finding(
        "leaked_clients",
        status,
        text,
        _why(conn_max_age, leak.longest, snapshot),
        app_subjects({app: n}),
        n,
        crossed(settings.thresholds.leaked_connections, status),
    )


def _why(conn_max_age: float | None, longest: float, snapshot: PgbSnapshot) -> str:
    """Why a Django connection stays idle that long, and what to do, for the application's CONN_MAX_AGE."""
    idle_timeout = snapshot.config.client_idle_timeout
    if idle_timeout:
        backstop = f"PgBouncer's client_idle_timeout={idle_timeout:g} s closes them only after that"
    elif conn_max_age is None:
        backstop = "PgBouncer's client_idle_timeout can close what is left (with CONN_HEALTH_CHECKS=True in Django)"
    else:
        backstop = "set PgBouncer's client_idle_timeout above CONN_MAX_AGE to close what is left"
    close = "call django.db.close_old_connections() when such a thread finishes its work"
    if conn_max_age is not None and longest > 2 * conn_max_age:
        return (
            f"idle far longer than its CONN_MAX_AGE={conn_max_age:g} s while the application went on serving with "
            "others: Django closes an expired connection only when a request starts or ends, so threads that ended "
            "or do their work outside requests keep theirs (background threads, executors, a server that starts a "
            f"thread per request as runserver does, async views' sync_to_async threads): {close}, and {backstop}"
        )
    if conn_max_age is None:
        return (
            "with CONN_MAX_AGE=None a connection stays for its thread's whole life, so threads that stopped serving "
            f"requests (background threads, idle workers) keep theirs: {close}, or give CONN_MAX_AGE a value; "
            f"{backstop}"
        )
    return f"a thread keeps a connection it no longer uses: {close}; {backstop}"


def clients_by_app(clients: PgbClients | None) -> Iterator[tuple[str, int]]:
    """(application, clients) of every group: what a budget counts at PgBouncer."""
    if clients is not None:
        for g in clients.groups:
            yield g.app, g.connections
