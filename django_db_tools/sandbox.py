"""Throwaway PostgreSQL and PgBouncer processes on free loopback ports.

Used by the demo, the benchmarks and the test suite. Standard library only, but for
psycopg to run SQL on a PostgreSQL build that ships no psql.
PostgreSQL and PgBouncer both refuse to run as root, so when started by root
they run as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "sandbox-secret"  # noqa: S105 - a throwaway local server
INSTALL_HINT = (
    "PostgreSQL 15 binaries (initdb, pg_ctl) and PgBouncer are needed: "
    "on Debian or Ubuntu run `apt-get install -y postgresql pgbouncer`, "
    "or set DJANGO_DB_PG_BIN to the folder holding initdb."
)


class SandboxError(RuntimeError):
    pass


def pg_bindir() -> Path:
    override = os.environ.get("DJANGO_DB_PG_BIN")
    candidates = [override] if override else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    raise SandboxError("initdb not found. " + INSTALL_HINT)


@dataclass(frozen=True)
class PgBinaries:
    """A PostgreSQL build: the folder holding initdb, pg_ctl and postgres, and the environment they need."""

    bindir: Path
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        """The installation folder: bin/ and its lib/ and share/ siblings."""
        return self.bindir.parent


def reachable_by_others(path: Path) -> bool:
    """Whether every folder down to ``path`` lets other users through (the servers may run as `postgres`)."""
    path = path.resolve()
    return all(os.stat(folder).st_mode & stat.S_IXOTH for folder in (path, *path.parents))


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.isfile("/usr/sbin/pgbouncer") else None)
    if not found:
        raise SandboxError("pgbouncer not found. " + INSTALL_HINT)
    return found


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never the same twice in this process.

    A port is only bound when its server starts, so without the memory two servers of
    one sandbox could be given the same port, and one would answer for the other.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise SandboxError(f"nothing listens on port {port} after {timeout} s\n{tail}")


def _run_as() -> str | None:
    """The user to run servers as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError as e:
        raise SandboxError("running as root needs a `postgres` user to run the servers as") from e
    return SUPERUSER


def _hand_over(path: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
            os.chown(name, entry.pw_uid, entry.pw_gid)


class Postgres:
    """A PostgreSQL cluster in a temporary folder, listening on 127.0.0.1 and a socket in that folder."""

    def __init__(
        self,
        base: Path,
        max_connections: int = 100,
        settings: dict[str, str] | None = None,
        binaries: PgBinaries | None = None,
    ):
        self.base = base
        self.datadir = base / "pgdata"
        self.socket_dir = base / "pgsocket"
        self.logfile = base / "postgres.log"
        self.port = free_port()
        self.max_connections = max_connections
        self.settings = settings or {}
        self.user = _run_as()
        self.binaries = binaries or PgBinaries(pg_bindir())
        self.bindir = self.binaries.bindir

    def _cmd(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.user,
            env={**os.environ, **self.binaries.env} if self.binaries.env else None,
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base,
        )

    def start(self) -> Postgres:
        self.base.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        pwfile = self.base / "pwfile"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        _hand_over(self.base, self.user)
        self._make_binaries_reachable()  # after handing over: links share their files with the cache
        self._cmd(
            "initdb", "-D", str(self.datadir), "-U", SUPERUSER, "--pwfile", str(pwfile),
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": str(self.max_connections),
            "superuser_reserved_connections": "3",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "logging_collector": "off",
        }
        conf.update(self.settings)
        with open(self.datadir / "postgresql.conf", "a") as handle:
            handle.write("\n" + "".join(f"{key} = {value}\n" for key, value in conf.items()))
        self._cmd("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60", "start")
        return self

    def _make_binaries_reachable(self) -> None:
        """Link a build the server's user cannot reach (one cached under root's home) into this folder.

        Hard links where the cache and this folder share a file system (the files keep their owner
        and their read and run bits for everyone), copies where they do not.
        """
        if self.user is None or reachable_by_others(self.bindir):
            return
        source = self.binaries.root
        linked = self.base / "postgresql"

        def link(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        shutil.copytree(source, linked, symlinks=True, copy_function=link, ignore=shutil.ignore_patterns("*.a"))
        env = {
            key: os.pathsep.join(
                str(linked / Path(part).relative_to(source)) if Path(part).is_relative_to(source) else part
                for part in value.split(os.pathsep)
            )
            for key, value in self.binaries.env.items()
        }
        self.binaries = PgBinaries(linked / self.bindir.relative_to(source), env)
        self.bindir = self.binaries.bindir

    def stop(self, mode: str = "immediate") -> None:
        if self.datadir.exists():
            self._cmd("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m fast|smart|immediate``, or a start after ``stop``: accepting connections on return."""
        self._cmd("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-m", mode, "-w", "-t", "60", "restart")

    def dsn(self, user: str = SUPERUSER, password: str = SUPERUSER_PASSWORD, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={user} password={password} dbname={dbname}"

    def instance(self, user: str = SUPERUSER, password: str = SUPERUSER_PASSWORD, dbname: str = "postgres") -> dict:
        return {"host": "127.0.0.1", "port": self.port, "username": user, "password": password, "dbname": dbname}


class PgBouncer:
    """A PgBouncer process in front of one PostgreSQL, with plain-text passwords in its auth file."""

    def __init__(
        self,
        base: Path,
        postgres: Postgres,
        users: dict[str, str],
        program: Sequence[str] | None = None,
        **settings: object,
    ):
        """``program``: the argument list that runs a PgBouncer build; the machine's ``pgbouncer`` by default."""
        self.base = base
        self.program = list(program) if program else None
        self.postgres = postgres
        self.users = dict(users)
        self.port = free_port()
        self.logfile = base / "pgbouncer.log"
        self.ini = base / "pgbouncer.ini"
        self.databases: dict[str, str] = {"*": f"host=127.0.0.1 port={postgres.port}"}
        self.settings: dict[str, object] = {
            "pool_mode": "transaction",
            "default_pool_size": 20,
            "max_client_conn": 100,
            "admin_users": SUPERUSER,
            "stats_users": "datadog",
            "ignore_startup_parameters": "extra_float_digits,options,statement_timeout",
        }
        self.settings.update(settings)
        self.user = _run_as()
        self.proc: subprocess.Popen | None = None
        self._version: tuple[int, ...] | None = None

    def write_config(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        users = "".join(f'"{name}" "{password}"\n' for name, password in self.users.items())
        (self.base / "userlist.txt").write_text(users)
        core = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": self.base / "userlist.txt",
            "logfile": self.logfile,
            "pidfile": self.base / "pgbouncer.pid",
        }
        lines = ["[databases]"] + [f"{name} = {conn}" for name, conn in self.databases.items()]
        lines += ["[pgbouncer]"] + [f"{key} = {value}" for key, value in {**core, **self.settings}.items()]
        self.ini.write_text("\n".join(lines) + "\n")
        _hand_over(self.base, self.user)

    def start(self) -> PgBouncer:
        self.write_config()
        self.proc = subprocess.Popen(
            [*(self.program or [pgbouncer_binary()]), str(self.ini)],
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.base,
        )
        wait_for_port(self.port, 20, self.proc, self.logfile)
        return self

    def reload(self) -> None:
        """Rewrite the ini file and make PgBouncer read it again."""
        self.write_config()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): it still accepts TCP connections but never answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    @property
    def version(self) -> tuple[int, ...]:
        """The build's version, from ``pgbouncer -V``: (1, 18, 0)."""
        if self._version is None:
            out = subprocess.run(
                [*(self.program or [pgbouncer_binary()]), "-V"], capture_output=True, text=True, timeout=30, check=False
            ).stdout
            found = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out)
            if found is None:
                raise SandboxError(f"no version in what pgbouncer -V printed: {out!r}")
            self._version = tuple(int(part or 0) for part in found.groups())
        return self._version

    def stop(self) -> bool:
        """Shut PgBouncer down at once, clients connected or not; whether it had to be killed.

        The immediate shutdown is SIGTERM before 1.23 and SIGQUIT from 1.23, where SIGTERM waits for
        every client to disconnect.
        """
        if self.proc is None:
            return False
        immediate = signal.SIGQUIT if self.version >= (1, 23) else signal.SIGTERM
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(immediate)
        killed = False
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            killed = True
        self.proc = None
        return killed

    def instance(self, user: str = "datadog", password: str | None = None) -> dict:
        return {"host": "127.0.0.1", "port": self.port, "username": user, "password": password or self.users[user]}


class Sandbox:
    """One PostgreSQL and one PgBouncer in a temporary folder, removed on ``close``."""

    MONITOR_USER = "datadog"
    MONITOR_PASSWORD = "datadog-secret"  # noqa: S105 - a throwaway local server

    def __init__(
        self,
        max_connections: int = 100,
        pg_settings: dict[str, str] | None = None,
        postgres_binaries: PgBinaries | None = None,
        pgbouncer_program: Sequence[str] | None = None,
        **pgbouncer: object,
    ):
        """``postgres_binaries``: the PostgreSQL build to run; the newest one installed on the machine by default.
        ``pgbouncer_program``: the argument list that runs the PgBouncer build; the machine's by default."""
        binaries = postgres_binaries or PgBinaries(pg_bindir())  # fails before anything is created
        self.root = Path(tempfile.mkdtemp(prefix="django-db-sandbox-"))
        os.chmod(self.root, 0o755)  # noqa: S103 - the servers run as another user
        self.postgres = Postgres(self.root / "pg", max_connections, pg_settings, binaries)
        self.pgbouncer = PgBouncer(
            self.root / "pgbouncer",
            self.postgres,
            {SUPERUSER: SUPERUSER_PASSWORD, self.MONITOR_USER: self.MONITOR_PASSWORD},
            pgbouncer_program,
            **pgbouncer,
        )

    def start(self, with_pgbouncer: bool = True) -> Sandbox:
        try:
            self.postgres.start()
            self.create_monitor_role()
            if with_pgbouncer:
                self.pgbouncer.start()
        except BaseException:
            self.close()
            raise
        return self

    def create_monitor_role(self) -> None:
        sql = (
            f"CREATE ROLE {self.MONITOR_USER} LOGIN PASSWORD '{self.MONITOR_PASSWORD}';"
            f"GRANT pg_monitor TO {self.MONITOR_USER};"
        )
        self.psql(sql)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser over the server's socket; rows as psql -At prints them."""
        if not (self.postgres.bindir / "psql").is_file():
            return self._sql_without_psql(sql, dbname)
        result = subprocess.run(
            [str(self.postgres.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At",
             "-h", str(self.postgres.socket_dir), "-p", str(self.postgres.port), "-U", SUPERUSER, "-d", dbname,
             "-c", sql],
            user=self.postgres.user, check=True, capture_output=True, text=True, timeout=60, cwd=self.root,
        )  # fmt: skip
        return result.stdout

    def _sql_without_psql(self, sql: str, dbname: str) -> str:
        import psycopg

        lines = []
        with psycopg.connect(
            host=str(self.postgres.socket_dir), port=self.postgres.port, user=SUPERUSER, dbname=dbname,
            autocommit=True, connect_timeout=10,
        ) as conn:  # fmt: skip
            cursor = conn.execute(sql.encode())  # no parameters: the simple protocol runs several statements
            while True:
                if cursor.description is not None:
                    lines += ["|".join("" if v is None else str(v) for v in row) for row in cursor.fetchall()]
                if not cursor.nextset():
                    break
        return "".join(line + "\n" for line in lines)

    def instance(self, with_pgbouncer: bool = True) -> dict:
        instance: dict = {"postgres": self.postgres.instance(self.MONITOR_USER, self.MONITOR_PASSWORD)}
        if with_pgbouncer:
            instance["pgbouncer"] = self.pgbouncer.instance(self.MONITOR_USER)
        return instance

    def close(self) -> None:
        try:
            self.pgbouncer.stop()
        finally:
            try:
                self.postgres.stop()
            finally:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
