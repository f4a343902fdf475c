"""Whose a PostgreSQL backend is, and what that makes it count in: the one rule every figure asks.

The PostgreSQL source says whose each backend is (``ActivityGroup.pooler``): an application's own (``DIRECT``), an
application's through a session-mode PgBouncer pool whose client holds it (``HELD``), a PgBouncer's the check reads
(``POOLER_OWN``), a pooler's at one of ``pooler_addresses`` (``EXTERNAL``), or a managed service's own session
(``PROVIDER``: rdsadmin, azuresu, cloudsqladmin, ...). Leaks, budgets, churn, the
connection series and OpenTelemetry's figures ask here, so a rule cannot hold in one of them and not in another.
"""

from __future__ import annotations

from .records import DIRECT, EXTERNAL, HELD, POOLER_OWN, PROVIDER

# Who opens a pooler's server connections, as churn names them: no application_name can hold a NUL.
PGBOUNCER_OPENS = "\0pgbouncer"
EXTERNAL_OPENS = "\0external"
PROVIDER_OPENS = "\0provider"
POOLERS_OPENING = frozenset({PGBOUNCER_OPENS, EXTERNAL_OPENS, PROVIDER_OPENS})  # nobody's application

_OPENS = {EXTERNAL: EXTERNAL_OPENS, PROVIDER: PROVIDER_OPENS}  # the rest are PgBouncer's (DIRECT: the app's)

_TAGS = {
    DIRECT: (),
    HELD: ("pooler:pgbouncer",),
    POOLER_OWN: ("pooler:pgbouncer",),
    EXTERNAL: ("pooler:external",),
    PROVIDER: (),  # its app tag says it: app:provider
}


def is_applications(owner: int) -> bool:
    """An application holds it: it may be that application's leak and counts in its budget."""
    return owner in (DIRECT, HELD)


def is_poolers(owner: int) -> bool:
    """A pooler or the provider keeps it on purpose: never an application's leak, budget or churn."""
    return owner in (POOLER_OWN, EXTERNAL, PROVIDER)


def is_providers(owner: int) -> bool:
    """A managed service's own session: its transactions and timeouts are the provider's, not the user's."""
    return owner == PROVIDER


def pooler_tags(owner: int) -> tuple[str, ...]:
    """``pooler:pgbouncer`` on PgBouncer's server connections (a session-mode client's too), ``pooler:external``
    on a declared pooler's; nothing on an application's own."""
    return _TAGS.get(owner, ())


def opener(owner: int, app: str) -> str:
    """Who opened the backend, for churn: the application, or the pooler (whatever name its last client gave)."""
    if owner == DIRECT:
        return app
    return _OPENS.get(owner, PGBOUNCER_OPENS)


def counted_at_postgres(owner: int, clients_read: bool) -> bool:
    """Whether a budget or a leak counts it at PostgreSQL: an application's own, and a session-mode client's
    server connection unless that client is counted at PgBouncer (its clients read this run)."""
    return owner == DIRECT or (owner == HELD and not clients_read)


def is_direct(owner: int) -> bool:
    """An application's own connection straight to PostgreSQL: what PostgreSQL's pool holds in OpenTelemetry's
    figures (PgBouncer's pools count its server connections already; a declared pooler's count in none)."""
    return owner == DIRECT
