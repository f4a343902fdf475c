"""Whose a PostgreSQL backend is, and what that makes it count in: the one rule every figure asks.

The PostgreSQL source says whose each backend is (``ActivityGroup.pooler``): an application's own (``DIRECT``), an
application's through a session-mode PgBouncer pool whose client holds it (``HELD``), a PgBouncer's the check reads
(``POOLER_OWN``), or a pooler's at one of ``pooler_addresses`` (``EXTERNAL``). Leaks, budgets, churn, the
connection series and OpenTelemetry's figures ask here, so a rule cannot hold in one of them and not in another.
"""

from __future__ import annotations

from .records import DIRECT, EXTERNAL, HELD, POOLER_OWN

# Who opens a pooler's server connections, as churn names them: no application_name can hold a NUL.
PGBOUNCER_OPENS = "\0pgbouncer"
EXTERNAL_OPENS = "\0external"
POOLERS_OPENING = frozenset({PGBOUNCER_OPENS, EXTERNAL_OPENS})

_TAGS = {
    DIRECT: (),
    HELD: ("pooler:pgbouncer",),
    POOLER_OWN: ("pooler:pgbouncer",),
    EXTERNAL: ("pooler:external",),
}


def is_applications(owner: int) -> bool:
    """An application holds it: it may be that application's leak and counts in its budget."""
    return owner in (DIRECT, HELD)


def is_poolers(owner: int) -> bool:
    """A pooler keeps it on purpose: never an application's leak, budget or churn."""
    return owner in (POOLER_OWN, EXTERNAL)


def pooler_tags(owner: int) -> tuple[str, ...]:
    """``pooler:pgbouncer`` on PgBouncer's server connections (a session-mode client's too), ``pooler:external``
    on a declared pooler's; nothing on an application's own."""
    return _TAGS.get(owner, ())


def opener(owner: int, app: str) -> str:
    """Who opened the backend, for churn: the application, or the pooler (whatever name its last client gave)."""
    if owner == DIRECT:
        return app
    return EXTERNAL_OPENS if owner == EXTERNAL else PGBOUNCER_OPENS


def counted_at_postgres(owner: int, clients_read: bool) -> bool:
    """Whether a budget or a leak counts it at PostgreSQL: an application's own, and a session-mode client's
    server connection unless that client is counted at PgBouncer (its clients read this run)."""
    return owner == DIRECT or (owner == HELD and not clients_read)


def is_direct(owner: int) -> bool:
    """An application's own connection straight to PostgreSQL: what PostgreSQL's pool holds in OpenTelemetry's
    figures (PgBouncer's pools count its server connections already; a declared pooler's count in none)."""
    return owner == DIRECT
