"""What transaction pooling loses: server-side cursors and prepared statements. No I/O.

A pooler in transaction mode hands each transaction to whichever server connection is free. A cursor
declared WITH HOLD (Django's ``QuerySet.iterator()`` in autocommit) and a statement psycopg prepared
(``server_side_binding`` with a ``prepare_threshold`` in Django's OPTIONS) live on one server connection:
the next FETCH or EXECUTE may reach another one. The advice says what to change for the stack the run
found: PgBouncer's pool modes from its console, and for prepared statements its version and
``max_prepared_statements`` (1.21 and later track protocol-level prepared statements themselves).
"""

from __future__ import annotations

import re
from collections.abc import Collection

from ..records import PgbPool, PgbSnapshot

CURSOR = "server_side_cursor_lost"
PREPARED = "prepared_statement_lost"
NAMES = frozenset({CURSOR, PREPARED})
POOLING_MODES = frozenset({"transaction", "statement"})  # modes that hand a client's transactions to any server
TRACKS_PREPARED = (1, 21)  # the first PgBouncer that keeps prepared statements across server connections
SHOWN = 3

CURSOR_CHANGE = "set DISABLE_SERVER_SIDE_CURSORS = True in the DATABASES entry that goes through {through}"
OPTIONS_CHANGE = "remove server_side_binding and prepare_threshold from that DATABASES entry's OPTIONS"
CURSOR_WHAT = (
    "a server-side cursor was read on another server connection than the one that declared it "
    "(Django's QuerySet.iterator() declares one that outlives its transaction)"
)
PREPARED_WHAT = "a prepared statement was run on another server connection than the one that prepared it"


def _first_up(text: str) -> str:
    return text[:1].upper() + text[1:]


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match[1]), int(match[2])) if match else None


def _listed(pools: list[PgbPool]) -> str:
    shown = ", ".join(f"{p.db}/{p.user} {p.pool_mode}" for p in pools[:SHOWN])
    return shown + (f" and {len(pools) - SHOWN} more" if len(pools) > SHOWN else "")


def _pools_of(pgb: PgbSnapshot, apps: Collection[str]) -> list[PgbPool]:
    """The pools the named applications' clients are at now (SHOW CLIENTS, 1.18 on), else every pool."""
    pools = list(pgb.pools)
    if apps and pgb.clients is not None and pgb.clients.has_app:
        used = {(group.db, group.user) for group in pgb.clients.groups if group.app in apps}
        return [p for p in pools if (p.db, p.user) in used] or pools
    return pools


def _modes(pgb: PgbSnapshot, apps: Collection[str]) -> tuple[str, bool]:
    """How PgBouncer's pools are set, as its console says, and whether any hands transactions to any server."""
    pools = _pools_of(pgb, apps)
    pooling = [p for p in pools if p.pool_mode in POOLING_MODES]
    if pooling:
        return f"pools in {'/'.join(sorted({p.pool_mode for p in pooling}))} mode: {_listed(pooling)}", True
    if pools:
        return f"pools in {'/'.join(sorted({p.pool_mode for p in pools}))} mode only: {_listed(pools)}", False
    mode = pgb.config.pool_mode
    return f"pool_mode = {mode or 'unknown'}, no pools yet", mode in POOLING_MODES


def advice(name: str, pgb: PgbSnapshot | None, apps: Collection[str] = ()) -> str:
    """What to change for a signature of ``NAMES``, told for the PgBouncer the run read (None: none configured);
    its pools are those of ``apps`` (the applications the logs named) where PgBouncer shows their clients."""
    what = _first_up(CURSOR_WHAT if name == CURSOR else PREPARED_WHAT)
    if pgb is None:
        cause = (
            "most likely a pooler in transaction mode is in front of PostgreSQL (PgBouncer with "
            "pool_mode = transaction, or a managed pooler), which hands each transaction to any server connection"
        )
        if name == CURSOR:
            return f"{what}: {cause}. {_first_up(CURSOR_CHANGE.format(through='the pooler'))}"
        return (
            f"{what}: {cause}. {_first_up(OPTIONS_CHANGE)}, or pool with PgBouncer 1.21 or later and "
            f"max_prepared_statements above 0"
        )
    modes, pooling = _modes(pgb, apps)
    if not pooling:
        cause = (
            f"PgBouncer keeps each client on one server connection ({modes}): another pooler in transaction "
            f"mode is likely in front of PostgreSQL"
        )
        change = CURSOR_CHANGE.format(through="it") if name == CURSOR else OPTIONS_CHANGE
        return f"{what}: {cause}. {_first_up(change)}"
    cause = f"PgBouncer hands each transaction to any server connection ({modes})"
    if name == CURSOR:
        return f"{what}: {cause}. {_first_up(CURSOR_CHANGE.format(through='PgBouncer'))}"
    return f"{what}: {cause}. {_prepared_change(pgb)}"


def _prepared_change(pgb: PgbSnapshot) -> str:
    version, kept = pgb.version or "of an unknown version", pgb.config.max_prepared_statements
    release = version_tuple(pgb.version)
    if release is None or release < TRACKS_PREPARED:
        return (
            f"PgBouncer {version} cannot keep prepared statements across server connections: "
            f"{OPTIONS_CHANGE}, or upgrade to PgBouncer 1.21 or later and set max_prepared_statements above 0"
        )
    if not kept:
        return (
            f"PgBouncer {version} keeps protocol-level prepared statements only with max_prepared_statements "
            f"above 0, and it is {'unset' if kept is None else '0'}: set it (200, say) in pgbouncer.ini and "
            f"reload, or {OPTIONS_CHANGE}"
        )
    return (
        f"PgBouncer {version} keeps protocol-level prepared statements already (max_prepared_statements = "
        f"{kept:g}): these were prepared where it cannot follow them (SQL PREPARE and EXECUTE, another pooler, "
        f"or before the setting was loaded); {OPTIONS_CHANGE}"
    )
