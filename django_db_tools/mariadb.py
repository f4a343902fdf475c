"""A throwaway MariaDB server on a free loopback port, with its own data directory and socket.

Used by the MySQL tests and ``./run demo --mysql``. Never the system service: ``mariadbd`` runs
from a temporary folder, as the ``mysql`` user when started by root, and is stopped on ``close``.
Standard library only; statements go through the ``mariadb`` client over the server's socket.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from .sandbox import SandboxError, free_port, wait_for_port

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

    def __init__(self, max_connections: int = 100, settings: dict[str, str] | None = None):
        self.mariadbd = _binary("mariadbd", "mysqld")
        self.install_db = _binary("mariadb-install-db", "mysql_install_db")
        self.client = _binary("mariadb", "mysql")
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
        subprocess.run(
            [self.install_db, "--no-defaults", f"--datadir={self.datadir}", "--auth-root-authentication-method=normal",
             "--skip-test-db", "--skip-name-resolve"],
            user=self.user, check=True, capture_output=True, text=True, timeout=120, cwd=self.root,
        )  # fmt: skip
        options = {
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
            **self.settings,
        }
        args = [f"--{key}" if value is None else f"--{key}={value}" for key, value in options.items()]
        self.proc = subprocess.Popen(
            [self.mariadbd, "--no-defaults", *args],
            user=self.user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.root,
        )  # fmt: skip
        wait_for_port(self.port, 60, self.proc, self.logfile)
        self.sql(
            f"CREATE USER '{MONITOR_USER}'@'%' IDENTIFIED BY '{MONITOR_PASSWORD}';"
            f"GRANT PROCESS ON *.* TO '{MONITOR_USER}'@'%';"
        )

    def sql(self, statements: str, database: str = "") -> str:
        """Run statements as root over the socket; returns the rows, tab separated."""
        result = subprocess.run(
            [self.client, "--no-defaults", f"--socket={self.socket}", "-uroot", "-N", "-B", "-e", statements,
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
