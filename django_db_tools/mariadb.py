"""A throwaway MariaDB (or Oracle MySQL) server on a free loopback port, with its own data directory and socket.

Used by the MySQL tests and ``./run demo --mysql``. Never the system service: ``mariadbd`` runs
from a temporary folder, as the ``mysql`` user when started by root, and is stopped on ``close``.
The machine's MariaDB by default; another build unpacked by ``django_db_tools.debian`` when given
(MariaDB 10.5 or 11.8, or MySQL's ``mysqld``, which makes its data directory with
``--initialize-insecure`` rather than ``mariadb-install-db``).
Standard library only; statements go through the ``mariadb`` client over the server's socket (the
build's own client for MariaDB, the machine's for MySQL, whose server package has none).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .sandbox import SandboxError, free_port, wait_for_port

if TYPE_CHECKING:
    from .debian import Build

RUN_AS = "mysql"
MONITOR_USER = "datadog"
MONITOR_PASSWORD = "datadog-secret"  # noqa: S105 - a throwaway local server
INSTALL_HINT = "MariaDB is needed: on Debian or Ubuntu run `apt-get install -y mariadb-server`."


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or next(
            (path for d in ("/usr/sbin", "/usr/bin") if os.path.isfile(path := f"{d}/{name}")), None
        )
        if found:
            return found
    raise SandboxError(f"{names[0]} not found. {INSTALL_HINT}")


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError as e:
        raise SandboxError("running as root needs a `mysql` user to run MariaDB as") from e
    return RUN_AS


class MariaDB:
    """One ``mariadbd`` in a temporary folder, listening on 127.0.0.1; removed on ``close``."""

    def __init__(self, max_connections: int = 100, settings: dict[str, str] | None = None, build: Build | None = None):
        """``build``: a MariaDB or MySQL build to run instead of the machine's MariaDB."""
        self.build = build
        self.mysql = build is not None and not (build.root / "usr/sbin/mariadbd").is_file()
        if build is None:
            self.mariadbd = [_binary("mariadbd", "mysqld")]
            self.install_db = [_binary("mariadb-install-db", "mysql_install_db")]
            self.client = [_binary("mariadb", "mysql")]
        elif self.mysql:
            self.mariadbd = build.command("mysqld")
            self.install_db = []
            self.client = [_binary("mariadb", "mysql")]
        else:
            self.mariadbd = build.command("mariadbd")
            # A script that runs my_print_defaults, resolveip and mariadbd by path: wrappers, in a basedir of its own.
            self.install_db = [str(build.root / "usr/bin/mariadb-install-db")]
            self.client = build.command("mariadb")
        self.root = Path(tempfile.mkdtemp(prefix="django-db-mariadb-"))
        os.chmod(self.root, 0o755)  # noqa: S103 - the server runs as another user
        self.datadir = self.root / "data"
        self.socket = self.root / "mariadb.sock"
        self.logfile = self.root / "error.log"
        self.port = free_port()
        self.max_connections = max_connections
        self.settings = settings or {}
        self.user = _run_as()
        self.proc: subprocess.Popen | None = None
        self.command: list[str] = []

    def start(self) -> MariaDB:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        paths = self._build_paths()
        if self.mysql:
            install = [*self.mariadbd, "--no-defaults", *paths, "--initialize-insecure", f"--datadir={self.datadir}"]
        else:
            basedir = [f"--basedir={self.build.root / '.wrapped'}"] if self.build is not None else []
            install = [*self.install_db, "--no-defaults", *basedir, f"--datadir={self.datadir}",
                       "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve"]  # fmt: skip
        done = subprocess.run(install, user=self.user, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            raise SandboxError(f"making the data directory failed: {(done.stdout + done.stderr)[-2000:]}")
        options: dict[str, object] = {
            "datadir": self.datadir,
            "port": self.port,
            "socket": self.socket,
            "pid-file": self.root / "mariadbd.pid",
            "bind-address": "127.0.0.1",
            "log-error": self.logfile,
            "max-connections": self.max_connections,
            "skip-name-resolve": None,
            "innodb-buffer-pool-size": "16M",
            "innodb-log-file-size": "8M",
            "innodb-flush-log-at-trx-commit": "0",
            "skip-log-bin": None,
            "performance-schema": "OFF",
        }
        if self.mysql:
            # MySQL's defaults kept: performance_schema on. It has no innodb_log_file_size since 8.0.30,
            # no X protocol wanted, and aborts without --secure-file-priv on a missing /var/lib/mysql-files.
            del options["innodb-log-file-size"], options["performance-schema"]
            options.update({"innodb-redo-log-capacity": "8M", "mysqlx": "OFF", "secure-file-priv": ""})
        options.update(self.settings)
        args = [f"--{key}" if value is None else f"--{key}={value}" for key, value in options.items()]
        self.command = [*self.mariadbd, "--no-defaults", *paths, *args]
        self.start_again()
        self.sql(
            f"CREATE USER '{MONITOR_USER}'@'%' IDENTIFIED BY '{MONITOR_PASSWORD}';"
            f"GRANT PROCESS ON *.* TO '{MONITOR_USER}'@'%';"
        )

    def start_again(self) -> None:
        """Start the server on its data directory, made by ``start``; return once it listens."""
        self.proc = subprocess.Popen(
            self.command, user=self.user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.root
        )
        wait_for_port(self.port, 60, self.proc, self.logfile)

    def _build_paths(self) -> list[str]:
        """Where a build's server finds its files: its own folders, not the machine's."""
        if self.build is None:
            return []
        usr = self.build.root / "usr"
        messages = next(d for d in (usr / "share/mariadb", usr / "share/mysql") if (d / "english").is_dir())
        paths = [f"--basedir={usr}", f"--lc-messages-dir={messages}"]
        if (usr / "lib/mysql/plugin").is_dir():
            paths.append(f"--plugin-dir={usr / 'lib/mysql/plugin'}")
        return paths

    @property
    def version(self) -> str:
        """What the server says it is: SELECT VERSION()."""
        return self.sql("SELECT VERSION()").strip()

    def sql(self, statements: str, database: str = "") -> str:
        """Run statements as root over the socket; returns the rows, tab separated."""
        result = subprocess.run(
            [*self.client, "--no-defaults", f"--socket={self.socket}", "-uroot", "-N", "-B", "-e", statements,
             *([database] if database else [])],
            check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return result.stdout

    def create_app(self, user: str, password: str, database: str) -> None:
        self.sql(
            f"CREATE DATABASE `{database}`;"
            f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}';"
            f"GRANT ALL ON `{database}`.* TO '{user}'@'%';"
        )

    def instance(self, user: str = MONITOR_USER, password: str = MONITOR_PASSWORD) -> dict:
        return {"host": "127.0.0.1", "port": self.port, "username": user, "password": password}

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> MariaDB:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
