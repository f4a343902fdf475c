"""PgBouncer's own server connections among PostgreSQL's backends: which they are, and what PgBouncer does on
purpose with them. No I/O.

A backend is PgBouncer's when a row of SHOW SERVERS is that backend, by its own identity, whatever address either
side uses to reach PostgreSQL: its ``remote_pid`` is the backend's ``pid`` and, over TCP, its ``local_addr`` and
``local_port`` (where PgBouncer connects from) are the ``client_addr`` and ``client_port`` PostgreSQL sees. Over a
Unix socket PostgreSQL shows no client address or port: the pid alone, of a server listening on this server's
port. A pid of another server PgBouncer fronts never counts: that backend has its own client port there, so the
same pid is one of this server's only if PgBouncer also connected from the same address and port.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..addresses import LOOPBACK, normalise
from ..records import HELD, POOLER_OWN, PgbConfig, PgbServer, PgbSnapshot, PgSnapshot, PoolerKeys, ServerAddress
from ..settings import Settings
from .groups import select
from .model import Finding, Status

UNIX = "unix"  # SHOW SERVERS' addr of a connection over a Unix socket
PORTS = 65536  # a backend's key: pid * PORTS + client port
MARGIN = 60.0  # seconds: PgBouncer's janitor closes late by a few seconds; far past is past this much more
# seconds: how long what a PgBouncer last said of its server connections stands for them while it cannot be read
# (hung, restarting, unreachable); past this, PostgreSQL's backends are not judged as the applications'.
KEPT_SECONDS = 300.0


def is_this_server(addr: str, port: int | None, where: ServerAddress) -> bool:
    """Whether PgBouncer's ``addr:port`` is the PostgreSQL the postgres section reaches, as far as addresses tell.

    Over a Unix socket (addr ``unix``) PgBouncer reaches a server on its own host: it is this one when the
    port is this server's and the check reaches it locally too (its own socket, or a loopback address)."""
    if port != where.port:
        return False
    if addr == UNIX:
        return where.socket or bool(where.addresses & LOOPBACK)
    address = normalise(addr.strip("[]"))
    return address is not None and address in where.addresses


def identities(server: PgbServer, where: ServerAddress) -> tuple[int, tuple[str, ...]] | None:
    """The backend a server connection is at this PostgreSQL, as the statement tests it: its key (pid * 65536 plus
    the client port, 0 over a socket) and the identities ``<key>@<client address>`` PostgreSQL may show (an IPv4
    address also as IPv4-mapped IPv6); None when the row cannot be this server's backend."""
    pid = server.remote_pid
    if pid is None or pid <= 0:
        return None
    key = server_key(server)
    if _socket(server):
        if server.port != where.port:  # another server's socket on PgBouncer's host
            return None
        return key, (f"{key}@",)
    address = normalise(server.local_addr.strip("[]"))
    if address is None or not server.local_port:
        return None
    found = [f"{key}@{address}"]
    if isinstance(ipaddress.ip_address(address), ipaddress.IPv4Address):
        found.append(f"{key}@::ffff:{address}")
    return key, tuple(found)


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

    def of(self, where: ServerAddress, targets: Collection[tuple[str, int]]) -> tuple[float, dict[str, float]]:
        """Logins to the server the postgres section reaches, and why PgBouncer closed its servers there: the
        log's ``addr:port`` is this server's by the check's addresses, or one of ``targets`` (``targets``: where
        PgBouncer dials it, learnt from its servers found here)."""

        def here(addr: str, port: int) -> bool:
            return (addr, port) in targets or is_this_server(addr, port, where)

        logins = sum(n for (addr, port), n in self.logins.items() if here(addr, port))
        reasons: dict[str, float] = {}
        for (addr, port, reason), n in self.closes.items():
            if here(addr, port):
                reasons[reason] = reasons.get(reason, 0) + n
        return float(logins), reasons


def without_leaks(pg: PgSnapshot) -> PgSnapshot:
    """The snapshot with no backend counted as leaked: while a PgBouncer's server connections cannot be told from
    the applications' (it could not be read), none is judged."""
    groups = tuple(g._replace(leaked=0) if g.leaked else g for g in pg.groups)
    return replace(pg, groups=groups, leak_suspects=())


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
    """What one read of a PgBouncer says of its server connections, kept apart from the snapshot's rows (which
    live only as long as its connection): kept for a run that cannot read PgBouncer, until ``read_at`` is too
    old. ``tag``: the PgBouncer's ``pgbouncer_server:`` tag."""

    servers: tuple[PgbServer, ...]
    session: frozenset[tuple[str, str]]  # (database, user) of the session-mode pools
    config: PgbConfig
    min_pool_sizes: Mapping[str, float] = field(default_factory=dict)  # a database's own min_pool_size, by its name
    tag: str = ""
    read_at: float = 0.0  # the check's monotonic clock when it was read

    def min_pool_size(self, db: str) -> float:
        """The connections PgBouncer keeps in a pool of the database PgBouncer names ``db`` whatever their age."""
        own = self.min_pool_sizes.get(db)
        return own if own is not None and own >= 0 else self.config.min_pool_size or 0

    def targets(self, pg: PgSnapshot) -> frozenset[tuple[str, int]]:
        """The ``addr:port`` PgBouncer dials this PostgreSQL at (its log names servers so), whatever address:
        those of its servers found among this server's backends by their identity."""
        found = matched(pg)
        return frozenset(
            (s.addr, s.port)
            for s in self.servers
            if s.port is not None and s.remote_pid is not None and server_key(s) in found
        )


def pooler_of(pgb: PgbSnapshot, tag: str = "", read_at: float = 0.0) -> Pooler:
    session = frozenset((pool.db, pool.user) for pool in pgb.pools if pool.pool_mode == "session")
    if pgb.config.pool_mode == "session":  # a pool SHOW POOLS does not list yet has the default mode
        session |= {(s.db, s.user) for s in pgb.servers if (s.db, s.user) not in {(p.db, p.user) for p in pgb.pools}}
    mins = {d.name: d.min_pool_size for d in pgb.databases if d.min_pool_size is not None and d.min_pool_size >= 0}
    return Pooler(pgb.servers, session, pgb.config, mins, tag, read_at)


def pooler_keys(poolers: Sequence[Pooler], where: ServerAddress) -> PoolerKeys:
    """The identities of the PgBouncers' server connections to this PostgreSQL: those a client of a session-mode
    pool holds, and PgBouncer's own."""
    held: set[str] = set()
    own: set[str] = set()
    pids: set[int] = set()
    for pooler in poolers:
        for server in pooler.servers:
            found = identities(server, where)
            if found is None:
                continue
            key, names = found
            pids.add(key)
            (held if server.linked and (server.db, server.user) in pooler.session else own).update(names)
    return PoolerKeys(tuple(sorted(held)), tuple(sorted(own)), tuple(sorted(pids)))


def matched(pg: PgSnapshot) -> dict[int, float]:
    """PgBouncer's server connections found at PostgreSQL by their identity: key, and how long idle (-1: not)."""
    return {key: idle for g in pg.groups if g.pooler in (HELD, POOLER_OWN) for key, idle in g.servers}


def unmatched(pg: PgSnapshot, pooler: Pooler, where: ServerAddress) -> int:
    """How many of a PgBouncer's server connections to this PostgreSQL's port are no backend of it, when none
    is: between PgBouncer and PostgreSQL something changes the address or port PostgreSQL sees (NAT, a port map,
    a Kubernetes Service); 0 when any is found, or PgBouncer has none."""
    keys = {found[0] for s in pooler.servers if (found := identities(s, where)) is not None}
    if not keys or keys & matched(pg).keys():
        return 0
    return len(keys)


def unmatched_finding(pooler: Pooler, count: int) -> Finding:
    return Finding(
        "pgbouncer_servers_unmatched",
        Status.WARNING,
        f"none of PgBouncer's {count} server connections is a backend PostgreSQL shows from the address and port "
        "PgBouncer connects from (a NAT, a port map or a Kubernetes Service between them): they cannot be told "
        "from the applications' own and may be judged as theirs",
        "list the addresses PostgreSQL sees PgBouncer's connections come from under pooler_addresses",
        figure=count,
        server=pooler.tag,
    )


def overdue_findings(pg: PgSnapshot, pooler: Pooler | None, settings: Settings) -> list[Finding]:
    """PgBouncer's idle server connections far past the timeouts after which it closes them: its anomaly, not an
    application's leak. The ``min_pool_size`` connections each pool keeps whatever their age are left out, pool by
    pool, as PgBouncer names its databases."""
    if pooler is None:
        return []
    config = pooler.config
    limit = overdue_seconds(config)
    if limit is None:
        return []
    by_key = {server_key(s): s for s in pooler.servers if s.remote_pid is not None}
    ours = {key: idle for g in select(pg.groups, settings) if g.pooler == POOLER_OWN for key, idle in g.servers}
    idle_past: Counter[tuple[str, str]] = Counter()
    for key, idle in ours.items():
        server = by_key.get(key)
        if server is not None and not server.linked and idle > limit:
            idle_past[(server.db, server.user)] += 1
    overdue = sum(max(0, n - int(pooler.min_pool_size(db))) for (db, _), n in idle_past.items())
    if overdue <= 0:
        return []
    named = (("server_idle_timeout", config.server_idle_timeout), ("server_lifetime", config.server_lifetime))
    timeouts = ", ".join(f"{name}={value:g} s" for name, value in named if value is not None)
    pools = ", ".join(f"{db}/{user} {n}" for (db, user), n in sorted(idle_past.items()))
    return [
        Finding(
            "pgbouncer_servers_overdue",
            Status.WARNING,
            f"{overdue} of PgBouncer's server connections idle at PostgreSQL for over {limit:g} s, far past "
            f"PgBouncer's own {timeouts} (its anomaly, not an application's leak; pools {pools})",
            "PgBouncer should have closed them; see whether it is paused or overloaded (SHOW DATABASES, "
            "SHOW POOLS), or reload it",
            figure=overdue,
            threshold=limit,
            server=pooler.tag,
        )
    ]


def _socket(server: PgbServer) -> bool:
    return server.addr == UNIX or server.local_addr == UNIX


def server_key(server: PgbServer) -> int:
    """The key of the backend a server connection is, as the statement makes it: pid * 65536 plus the client port
    PostgreSQL sees (0 over a Unix socket)."""
    port = 0 if _socket(server) else max(0, server.local_port or 0)
    return (server.remote_pid or 0) * PORTS + port
