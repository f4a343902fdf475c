"""Start the web application under gunicorn on a free loopback port, drive requests, stop it.

    with Webapp(db, app_name="web", workers=2, threads=4, pool="django", pool_max_size=2) as app:
        statuses = app.drive("/query/", count=50, concurrency=8)

Standard library only; gunicorn and Django must be installed (the ``dev`` extras).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..sandbox import SandboxError, free_port, wait_for_port

HERE = Path(__file__).parent
REPO = HERE.parent.parent


@dataclass(frozen=True)
class Database:
    host: str
    port: int
    name: str
    user: str
    password: str


@dataclass(frozen=True)
class Response:
    status: int
    body: str


class Webapp:
    """One gunicorn master and its workers, in their own process group."""

    def __init__(
        self,
        db: Database,
        app_name: str = "webapp",
        workers: int = 1,
        threads: int = 2,
        max_requests: int = 0,
        conn_max_age: int | None = 0,
        pool: str = "",
        pool_min_size: int = 1,
        pool_max_size: int = 4,
        pool_timeout: float = 30,
        pool_overflow: int = 0,
        prometheus: bool = False,
        prometheus_ports: int = 0,
        prometheus_multiprocess: bool = False,
        log_file: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.db = db
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="django-db-webapp-"))
        self.log_file = log_file or self.folder / "django.log"
        self.gunicorn_log = self.folder / "gunicorn.log"
        self.settings = {
            "WEBAPP_DB_HOST": db.host,
            "WEBAPP_DB_PORT": str(db.port),
            "WEBAPP_DB_NAME": db.name,
            "WEBAPP_DB_USER": db.user,
            "WEBAPP_DB_PASSWORD": db.password,
            "WEBAPP_APP_NAME": app_name,
            "WEBAPP_CONN_MAX_AGE": "none" if conn_max_age is None else str(conn_max_age),
            "WEBAPP_POOL": pool,
            "WEBAPP_POOL_MIN_SIZE": str(pool_min_size),
            "WEBAPP_POOL_MAX_SIZE": str(pool_max_size),
            "WEBAPP_POOL_TIMEOUT": str(pool_timeout),
            "WEBAPP_POOL_OVERFLOW": str(pool_overflow),
            "WEBAPP_PROMETHEUS": "1" if prometheus else "",
            "WEBAPP_LOG_FILE": str(self.log_file),
            "WEBAPP_BIND": f"127.0.0.1:{self.port}",
            "WEBAPP_WORKERS": str(workers),
            "WEBAPP_THREADS": str(threads),
            "WEBAPP_MAX_REQUESTS": str(max_requests),
            **(env or {}),
        }
        # django-prometheus with several workers: a port for each (the range), or one merged page.
        self.metrics_ports = [free_port() for _ in range(prometheus_ports)]
        if self.metrics_ports:
            self.settings["WEBAPP_PROMETHEUS_PORTS"] = ",".join(map(str, self.metrics_ports))
        if prometheus_multiprocess:
            multiproc = self.folder / "prometheus"
            multiproc.mkdir()
            self.settings["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
        self.proc: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("WEBAPP_") and key.upper() != "PROMETHEUS_MULTIPROC_DIR"
        }
        env.update(self.settings)
        env["DJANGO_SETTINGS_MODULE"] = "django_db_tools.webapp.settings"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        return env

    def start(self, timeout: float = 30) -> Webapp:
        with open(self.gunicorn_log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", str(HERE / "gunicorn_conf.py")],
                env=self.environment(),
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            for port in (self.port, *self.metrics_ports):
                wait_for_port(port, timeout, self.proc, self.gunicorn_log)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get("/health/", timeout=2).status == 200:
                return
            time.sleep(0.1)
        raise SandboxError(f"the web application did not answer /health/ in {timeout} s\n{self.output()}")

    @property
    def metrics_urls(self) -> list[str]:
        """django-prometheus's pages: one per worker with ``prometheus_ports``, else the app's ``/metrics``."""
        if self.metrics_ports:
            return [f"http://127.0.0.1:{port}/metrics" for port in self.metrics_ports]
        return [self.url("/metrics")]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 30) -> Response:
        """One request; a failed one is a status (500, or 0 when nothing answered), never an exception."""
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as reply:  # noqa: S310 - loopback only
                return Response(reply.status, reply.read().decode(errors="replace"))
        except urllib.error.HTTPError as e:
            return Response(e.code, e.read().decode(errors="replace"))
        except OSError as e:
            return Response(0, str(e))

    def drive(self, path: str, count: int, concurrency: int = 1, timeout: float = 30) -> list[Response]:
        """``count`` requests to ``path``, ``concurrency`` at a time; their responses in order."""
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(lambda _: self.get(path, timeout), range(count)))

    def output(self) -> str:
        """gunicorn's own output (start-up errors, worker deaths)."""
        return self.gunicorn_log.read_text(errors="replace")[-4000:] if self.gunicorn_log.exists() else ""

    def django_log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to the master (workers finish their requests and close their connections), then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers the master left behind
        except ProcessLookupError:
            pass
        proc.wait(10)

    def close(self) -> None:
        """Stop, and remove the folder unless the Django log was put elsewhere by the caller."""
        self.stop()
        for path in (self.gunicorn_log, self.folder / "django.log"):
            path.unlink(missing_ok=True)
        multiproc = self.folder / "prometheus"
        if multiproc.is_dir():
            for path in multiproc.iterdir():
                path.unlink()
            multiproc.rmdir()
        try:
            self.folder.rmdir()
        except OSError:
            pass

    def __enter__(self) -> Webapp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
