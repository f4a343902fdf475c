"""Rules on how Django, PgBouncer and PostgreSQL settings fit together. No I/O."""

from __future__ import annotations

from collections import Counter

from ..owners import is_providers
from ..quiet import is_monitoring
from ..records import PgbSnapshot, PgSnapshot, ServerSettings, milliseconds
from ..settings import Settings
from .groups import select
from .model import Finding, Status, Subject, for_app, tag_value


def _age(conn_max_age: float | None) -> str:
    return "conn_max_age=None (persistent)" if conn_max_age is None else f"conn_max_age={conn_max_age:g} s"


def session_mode(conn_max_age: float | None, pgb: PgbSnapshot) -> list[Finding]:
    if conn_max_age is not None and conn_max_age <= 0:
        return []
    modes = {pool.db: pool.pool_mode for pool in pgb.pools}
    for database in pgb.databases:
        modes.setdefault(database.name, database.pool_mode or pgb.config.pool_mode or "unknown")
    pinned = sorted(db for db, mode in modes.items() if mode == "session")
    if not modes and pgb.config.pool_mode == "session":
        pinned = ["(default pool_mode)"]
    if not pinned:
        return []
    return [
        Finding(
            "session_mode_pins_servers",
            Status.WARNING,
            f"{_age(conn_max_age)} while PgBouncer pools {', '.join(pinned)} in session mode",
            "every Django thread pins a server connection; use pool_mode=transaction",
            figure=conn_max_age,
        )
    ]


def idle_timeouts(conn_max_age: float | None, pgb: PgbSnapshot) -> list[Finding]:
    """CONN_MAX_AGE against the one PgBouncer timeout that closes Django's connections: client_idle_timeout.

    server_idle_timeout and server_lifetime close only PgBouncer's server connections no client holds:
    Django never sees them, and a shorter CONN_MAX_AGE would only make Django log in again more often."""
    timeout = pgb.config.client_idle_timeout
    if not timeout or timeout <= 0:
        return []  # 0 turns it off
    if conn_max_age is not None and conn_max_age <= timeout:
        return []
    return [
        Finding(
            "conn_max_age_over_client_idle_timeout",
            Status.WARNING,
            f"{_age(conn_max_age)} is longer than PgBouncer's client_idle_timeout={timeout:g} s, after which it "
            "closes idle client connections (Django's)",
            "a request that reuses one fails; keep CONN_MAX_AGE at or below it (with CONN_HEALTH_CHECKS=True), "
            "or raise client_idle_timeout",
            figure=conn_max_age,
            threshold=timeout,
        )
    ]


def possible_server_connections(pgb: PgbSnapshot) -> int:
    """Pool sizes plus reserve pools, over databases and users, capped by max_db_connections.

    A database PgBouncer made from its ``*`` entry can be missing from SHOW DATABASES while its
    pools serve clients (PgBouncer sets it aside as idle when no client had reached its pools yet,
    and brings it back only at the next login): such pools count with the server's defaults.
    """
    config = pgb.config
    users = Counter(pool.db for pool in pgb.pools)
    total = 0.0
    for database in pgb.databases:
        size = database.pool_size
        size = config.default_pool_size or 0 if size is None or size < 0 else size
        reserve = database.reserve_pool_size
        reserve = config.reserve_pool_size or 0 if reserve is None or reserve < 0 else reserve
        possible = max(1, users[database.name]) * (size + reserve)
        cap = database.max_connections or config.max_db_connections or 0
        total += min(possible, cap) if cap > 0 else possible
    listed = {database.name for database in pgb.databases}
    unlisted: dict[str, float] = {}
    for pool in pgb.pools:
        if pool.db not in listed:
            unlisted[pool.db] = unlisted.get(pool.db, 0.0) + (pool.pool_size or 0) + (config.reserve_pool_size or 0)
    cap = config.max_db_connections or 0
    total += sum(min(possible, cap) if cap > 0 else possible for possible in unlisted.values())
    return int(total)


def slots(pg: PgSnapshot, pgb: PgbSnapshot) -> list[Finding]:
    possible, usable = possible_server_connections(pgb), pg.settings.usable_slots
    if possible <= usable:
        return []
    return [
        Finding(
            "pool_sizes_over_slots",
            Status.WARNING,
            f"PgBouncer may open {possible} server connections (pool sizes plus reserve pools) "
            f"but PostgreSQL has {usable} usable slots",
            "lower the pool sizes or set max_db_connections",
            figure=possible,
            threshold=usable,
        )
    ]


def effective(server: ServerSettings, db: str, role: str, name: str, server_value: int | None) -> int | None:
    """A setting as a session of ``role`` on ``db`` gets it: role and database, role, database, server
    (None where the server's value is not known and nothing closer sets it)."""
    found: dict[tuple[bool, bool], str] = {}
    for set_db, set_role, config in server.role_settings:
        if name in config and set_db in ("", db) and set_role in ("", role):
            found[(set_role != "", set_db != "")] = config[name]
    for key in ((True, True), (True, False), (False, True)):
        if key in found:
            return milliseconds(found[key])
    return server_value


def timeouts(settings: Settings, pg: PgSnapshot, pgb: PgbSnapshot | None) -> list[Finding]:
    # Monitoring sessions (this check's other instances, Datadog's postgres check), the check's own role and a
    # managed service's own sessions are no application's: their timeouts are not judged.
    own = settings.postgres.username if settings.postgres else None
    pairs = {
        (g.db, g.user)
        for g in select(pg.groups, settings)
        if g.db and g.user and g.user != own and not is_monitoring(g.app) and not is_providers(g.pooler)
    }
    if not pairs and pgb is not None:
        pairs = {(pool.db, pool.user) for pool in pgb.pools}
    server = pg.settings
    masked = dict(server.masked)
    statement_server = None if "statement_timeout" in masked else server.statement_timeout_ms
    idle_tx_server = None if "idle_in_transaction_session_timeout" in masked else server.idle_in_transaction_timeout_ms
    unset: list[str] = []
    untold: list[str] = []
    for db, role in sorted(pairs):
        statement = effective(server, db, role, "statement_timeout", statement_server)
        idle_tx = effective(server, db, role, "idle_in_transaction_session_timeout", idle_tx_server)
        if (statement or 0) > 0 or (idle_tx or 0) > 0:
            continue
        (untold if statement is None or idle_tx is None else unset).append(f"{role}@{db}")
    failures = []
    if unset:
        failures.append(
            Finding(
                "timeouts_unset",
                Status.WARNING,
                f"statement_timeout and idle_in_transaction_session_timeout are both unset for {_some(unset)}",
                "a stuck request holds its connection for ever; ALTER ROLE ... SET statement_timeout = '30s'",
                _role_subjects(unset),
                len(unset),
            )
        )
    if untold:
        monitor = settings.postgres.username if settings.postgres else "the monitoring role"
        hidden = ", ".join(f"{name} (source {source})" for name, source in sorted(masked.items()))
        reset = " and ".join(_reset(settings, name, source) for name, source in sorted(masked.items()))
        failures.append(
            Finding(
                "timeouts_unknown",
                Status.WARNING,
                f"cannot tell whether statement_timeout or idle_in_transaction_session_timeout is set for "
                f"{_some(untold)}: they have no role or database setting of their own, and the server's value "
                f"is hidden from {monitor} by its own session's {hidden} while pg_file_settings is closed to it",
                f"{reset} (the check bounds its own queries), or set the timeouts on the application's roles",
                _role_subjects(untold),
                len(untold),
            )
        )
    return failures


def _reset(settings: Settings, name: str, source: str) -> str:
    """How to take away the monitoring session's own value of a setting, by where it comes from."""
    role = settings.postgres.username if settings.postgres else "<monitoring role>"
    db = settings.postgres.dbname if settings.postgres else "<database>"
    if source == "user":
        return f"ALTER ROLE {role} RESET {name}"
    if source == "database":
        return f"ALTER DATABASE {db} RESET {name}"
    if source == "database user":
        return f"ALTER ROLE {role} IN DATABASE {db} RESET {name}"
    return f"do not set {name} for the check's connection"


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _role_subjects(names: list[str]) -> tuple[Subject, ...]:
    """``role@db`` names as user and db subjects."""
    pairs = (name.rpartition("@") for name in names)
    return tuple(Subject((f"user:{tag_value(role)}", f"db:{tag_value(db)}")) for role, _, db in pairs)


def django_rules(settings: Settings, pgb: PgbSnapshot) -> list[Finding]:
    """The CONN_MAX_AGE rules: once for the instance's conn_max_age, then for each application profile
    that gives its own, named after it."""
    failures = [*session_mode(settings.conn_max_age, pgb), *idle_timeouts(settings.conn_max_age, pgb)]
    for profile in settings.apps:
        if profile.conn_max_age != settings.conn_max_age:
            own = [*session_mode(profile.conn_max_age, pgb), *idle_timeouts(profile.conn_max_age, pgb)]
            failures += [for_app(failure, profile.name) for failure in own]
    return failures


def alignment_failures(settings: Settings, pg: PgSnapshot, pgb: PgbSnapshot) -> list[Finding]:
    on_pgbouncer = [
        f._replace(server=settings.pgbouncer.tag) if settings.pgbouncer else f for f in django_rules(settings, pgb)
    ]
    on_postgres = [*slots(pg, pgb), *timeouts(settings, pg, pgb)]
    if settings.postgres:
        on_postgres = [f._replace(server=settings.postgres.tag) for f in on_postgres]
    return on_pgbouncer + on_postgres
