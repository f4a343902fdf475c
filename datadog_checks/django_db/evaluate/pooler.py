"""PgBouncer's own server connections among PostgreSQL's backends: which they are, and what PgBouncer does on
purpose with them. No I/O.

A backend is PgBouncer's when a row of SHOW SERVERS talks to this PostgreSQL (its ``addr``/``port`` are the
postgres section's server) and names it: ``remote_pid`` is the backend's pid and, over TCP, ``local_port`` the
port PostgreSQL sees as ``client_port``. A pid of another server PgBouncer fronts never counts: its row talks
to another address or port.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..addresses import LOOPBACK, normalise
from ..records import POOLER_OWN, PgbConfig, PgbServer, PgbSnapshot, PgSnapshot, PoolerKeys, ServerAddress
from ..settings import Settings
from .groups import select
from .model import Finding, Status

UNIX = "unix"  # SHOW SERVERS' addr of a connection over a Unix socket
PORTS = 65536  # a backend's key: pid * PORTS + client port
MARGIN = 60.0  # seconds: PgBouncer's janitor closes late by a few seconds; far past is past this much more


def talks_to(server: PgbServer, where: ServerAddress) -> bool:
    """Whether PgBouncer's server connection talks to the PostgreSQL the postgres section reaches."""
    return is_this_server(server.addr, server.port, where)


def is_this_server(addr: str, port: int | None, where: ServerAddress) -> bool:
    """Whether PgBouncer's ``addr:port`` is the PostgreSQL the postgres section reaches.

    Over a Unix socket (addr ``unix``) PgBouncer reaches a server on its own host: it is this one when the
    port is this server's and the check reaches it locally too (its own socket, or a loopback address)."""
    if port != where.port:
        return False
    if addr == UNIX:
        return where.socket or bool(where.addresses & LOOPBACK)
    address = normalise(addr.strip("[]"))
    return address is not None and address in where.addresses


# PgBouncer's log: "S-0x55d...: appdb/app@127.0.0.1:5432 new connection to server (from 127.0.0.1:40000)" and
# "S-0x55d...: appdb/app@127.0.0.1:5432 closing because: server lifetime over (age=2s)".
SERVER_LINE = re.compile(
    r"\bS-0x[0-9a-f]+: \S*@(?P<addr>\S+):(?P<port>\d+) "
    r"(?:(?P<new>new connection to server)|closing because: (?P<reason>.+?)(?: \(age=.*)?$)"
)


@dataclass
class ServerEvents:
    """What PgBouncer's log says of its server connections, by the server's ``addr:port``."""

    logins: Counter[tuple[str, int]] = field(default_factory=Counter)
    closes: Counter[tuple[str, int, str]] = field(default_factory=Counter)  # (addr, port, reason)

    def feed(self, lines: Iterable[str]) -> None:
        for line in lines:
            if "S-0x" not in line:
                continue
            match = SERVER_LINE.search(line.rstrip("\r\n"))
            if match is None:
                continue
            where = (match["addr"], int(match["port"]))
            if match["new"]:
                self.logins[where] += 1
            else:
                self.closes[(*where, match["reason"].strip())] += 1

    def of(self, where: ServerAddress) -> tuple[float, dict[str, float]]:
        """Logins to the server the postgres section reaches, and why PgBouncer closed its servers there."""
        logins = sum(n for (addr, port), n in self.logins.items() if is_this_server(addr, port, where))
        reasons: dict[str, float] = {}
        for (addr, port, reason), n in self.closes.items():
            if is_this_server(addr, port, where):
                reasons[reason] = reasons.get(reason, 0) + n
        return float(logins), reasons


def server_key(pid: int, port: int | None) -> int:
    return pid * PORTS + max(0, port or 0)


def overdue_seconds(config: PgbConfig) -> float | None:
    """Idle past this, PgBouncer should have closed a server connection no client holds: ``server_idle_timeout``
    (0 turns it off) or ``server_lifetime`` (it closes an unused server connected longer; 0: used once), the
    shorter, plus as much again (a minute at least). None when neither is on: PgBouncer keeps them."""
    limits = [t for t in (config.server_idle_timeout,) if t is not None and t > 0]
    if config.server_lifetime is not None and config.server_lifetime >= 0:
        limits.append(config.server_lifetime)
    if not limits:
        return None
    limit = min(limits)
    return limit + max(limit, MARGIN)


@dataclass(frozen=True)
class Pooler:
    """What one read of PgBouncer says of its server connections, kept apart from the snapshot's rows (which
    live only as long as its connection): kept for a run that cannot read PgBouncer."""

    servers: tuple[PgbServer, ...]
    session: frozenset[tuple[str, str]]  # (database, user) of the session-mode pools
    config: PgbConfig
    min_pool_sizes: Mapping[str, float] = field(default_factory=dict)  # a database's own min_pool_size

    def min_pool_size(self, db: str) -> float:
        own = self.min_pool_sizes.get(db)
        return own if own is not None and own >= 0 else self.config.min_pool_size or 0


def pooler_of(pgb: PgbSnapshot) -> Pooler:
    session = frozenset((pool.db, pool.user) for pool in pgb.pools if pool.pool_mode == "session")
    if pgb.config.pool_mode == "session":  # a pool SHOW POOLS does not list yet has the default mode
        session |= {(s.db, s.user) for s in pgb.servers if (s.db, s.user) not in {(p.db, p.user) for p in pgb.pools}}
    mins = {d.name: d.min_pool_size for d in pgb.databases if d.min_pool_size is not None and d.min_pool_size >= 0}
    return Pooler(pgb.servers, session, pgb.config, mins)


def pooler_keys(pooler: Pooler, where: ServerAddress) -> PoolerKeys:
    """The keys of PgBouncer's server connections to this PostgreSQL: those a client of a session-mode pool
    holds, and PgBouncer's own."""
    held: list[int] = []
    own: list[int] = []
    for server in pooler.servers:
        if server.remote_pid is None or not talks_to(server, where):
            continue
        key = server_key(server.remote_pid, None if server.addr == UNIX else server.local_port)
        (held if server.linked and (server.db, server.user) in pooler.session else own).append(key)
    return PoolerKeys(tuple(sorted(held)), tuple(sorted(own)), overdue_seconds(pooler.config))


def overdue_findings(pg: PgSnapshot, pooler: Pooler | None, settings: Settings) -> list[Finding]:
    """PgBouncer's idle server connections far past the timeouts after which it closes them: its anomaly, not an
    application's leak. The ``min_pool_size`` connections a pool keeps whatever their age are left out."""
    if pooler is None:
        return []
    config = pooler.config
    limit = overdue_seconds(config)
    own = [g for g in select(pg.groups, settings) if g.pooler == POOLER_OWN]
    overdue = sum(g.overdue for g in own)
    overdue -= int(sum(pooler.min_pool_size(db) for db, _ in {(g.db, g.user) for g in own}))
    if limit is None or overdue <= 0:
        return []
    named = (("server_idle_timeout", config.server_idle_timeout), ("server_lifetime", config.server_lifetime))
    timeouts = ", ".join(f"{name}={value:g} s" for name, value in named if value is not None)
    return [
        Finding(
            "pgbouncer_servers_overdue",
            Status.WARNING,
            f"{overdue} of PgBouncer's server connections idle at PostgreSQL for over {limit:g} s, far past "
            f"PgBouncer's own {timeouts} (its anomaly, not an application's leak)",
            "PgBouncer should have closed them; see whether it is paused or overloaded (SHOW DATABASES, "
            "SHOW POOLS), or reload it",
            figure=overdue,
            threshold=limit,
        )
    ]
