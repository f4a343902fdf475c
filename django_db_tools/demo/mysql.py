"""The demo on MariaDB: ``python -m django_db_tools demo --mysql``.

A throwaway MariaDB (max_connections=10, wait_timeout=30), the Django application of
``django_db_tools.mysql_app`` on it (CONN_MAX_AGE=60, persistent worker threads), and three phases:

1. healthy      a few clients; connections are reused.
2. transaction  a request holds a transaction open while the workers' idle connections age (leaks).
3. saturation   more concurrent requests than max_connections: Django logs (1040, 'Too many connections').

The check runs every few seconds; each run prints its figures, the health message and the alignment
warning (CONN_MAX_AGE=60 is longer than wait_timeout=30).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TextIO

from ..mariadb import MariaDB
from .live import Figures, findings, wrap

APP_USER = "shop"
APP_PASSWORD = "shop-demo-secret"  # noqa: S105 - a throwaway local server
CONN_MAX_AGE = 60
WAIT_TIMEOUT = 30
THREADS = 16


class Clients:
    """``count`` threads requesting ``path`` until stopped; counts the answers."""

    def __init__(self, base: str, path: str, count: int):
        self.stopped = threading.Event()
        self.ok = self.failed = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(base + path,), daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _loop(self, url: str) -> None:
        while not self.stopped.is_set():
            try:
                with urllib.request.urlopen(url, timeout=30):  # noqa: S310 - our own server
                    ok = True
            except (urllib.error.URLError, OSError):
                ok = False
            with self.lock:
                self.ok += ok
                self.failed += not ok
            self.stopped.wait(0.2)

    def stop(self) -> str:
        self.stopped.set()
        for thread in self.threads:
            thread.join(35)
        return f"{self.ok} ok, {self.failed} failed"


def _render(run: Figures) -> list[str]:
    states = run.by("django_db.mysql.connections", "state")
    lines = [
        f"  mysql      connections {sum(states.values()):.0f} by state: "
        + (", ".join(f"{k} {v:.0f}" for k, v in sorted(states.items())) or "none")
        + f"  utilisation {run.total('django_db.mysql.connection_utilization') or 0:.0%}"
        f"  leaked {run.total('django_db.mysql.leaked_connections') or 0:.0f}"
        f"  oldest transaction {run.highest('django_db.mysql.transaction.max_age') or 0:.0f}s",
        f"  health     {run.status('django_db.connection_health')}",
    ]
    health = run.service_checks.get("django_db.connection_health")
    if health is not None and health.message:
        for part in findings(health.message):
            lines += wrap(part)
    alignment = run.service_checks.get("django_db.config_alignment")
    lines.append(f"  alignment  {run.status('django_db.config_alignment')}")
    if alignment is not None and alignment.message:
        lines += wrap(alignment.message)
    if run.error:
        lines += wrap(f"check error: {run.error}", indent="  ")
    return lines


def run(phase_seconds: float, interval: float, out: TextIO, err: TextIO) -> int:
    from datadog_checks.base.stubs import aggregator

    from datadog_checks.django_db import DjangoDbCheck

    out.write("django_db demo on MariaDB: starting a throwaway server and a Django application\n")
    with MariaDB(max_connections=10) as server:
        server.create_app(APP_USER, APP_PASSWORD, "shop")
        server.sql(f"SET GLOBAL wait_timeout = {WAIT_TIMEOUT}")
        log = Path(server.root) / "django.log"
        app = subprocess.Popen(
            [sys.executable, "-m", "django_db_tools.mysql_app", "--port", str(server.port), "--user", APP_USER,
             "--password", APP_PASSWORD, "--database", "shop", "--conn-max-age", str(CONN_MAX_AGE),
             "--threads", str(THREADS), "--log", str(log)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )  # fmt: skip
        try:
            assert app.stdout is not None
            line = app.stdout.readline()
            if not line.startswith("listening on "):
                err.write("django_db demo: the Django application did not start\n")
                return 1
            base = f"http://127.0.0.1:{int(line.split()[-1])}"
            instance = {
                "mysql": server.instance(),
                "conn_max_age": CONN_MAX_AGE,
                "leak_idle_seconds": max(2.0, phase_seconds / 2),
                "thresholds": {"idle_in_transaction_seconds": {"warning": max(2.0, phase_seconds / 3)}},
                "log_files": [str(log)],
            }
            check = DjangoDbCheck("django_db", {}, [instance])
            out.write(f"sandbox: {server.root}\nMariaDB on 127.0.0.1:{server.port}, Django on {base}\n")
            out.flush()
            phases = [
                ("healthy", "/items", 3),
                ("transaction", f"/transaction?seconds={phase_seconds:g}", 1),
                ("saturation", f"/hold?seconds={max(1.0, phase_seconds / 3):g}", THREADS),
            ]
            for number, (name, path, count) in enumerate(phases, 1):
                out.write(f"\n== phase {number} of {len(phases)}: {name} ({count} clients on {path})\n")
                clients = Clients(base, path, count)
                ends = time.monotonic() + phase_seconds
                while time.monotonic() < ends:
                    time.sleep(min(interval, max(0.0, ends - time.monotonic())))
                    aggregator.reset()
                    error = check.run()
                    metrics = [stub for n in aggregator.metric_names for stub in aggregator.metrics(n)]
                    checks = [stub for n in aggregator.service_check_names for stub in aggregator.service_checks(n)]
                    out.write(f"-- {time.strftime('%H:%M:%S')}\n" + "\n".join(_render(Figures(metrics, checks, error))))
                    out.write("\n")
                    out.flush()
                out.write(f"  requests   {clients.stop()}\n")
            check.cancel()
        except KeyboardInterrupt:
            out.write("\ninterrupted\n")
        finally:
            app.terminate()
            app.communicate(timeout=30)
    out.write("done: MariaDB stopped and removed\n")
    return 0
