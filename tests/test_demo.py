"""`python -m django_db_tools demo` end to end: real servers, a real Django app, real signals."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from datadog_checks.django_db.config import parse
from datadog_checks.django_db.evaluate.health import fitted
from datadog_checks.django_db.evaluate.signatures import BY_NAME
from django_db_tools.demo import live

PHASES = ("healthy", "leak", "stuck", "saturation")
SANDBOX_PREFIX = os.path.join(tempfile.gettempdir(), "django-db-sandbox-")


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid: (parent pid, state, command line) for every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0], cmdline)
    return table


def server_pids(root: str) -> set[int]:
    """The sandbox's servers (their command line names its folder) and their children."""
    table = _proc_table()
    owners = {pid for pid, (_, _, cmdline) in table.items() if root in cmdline}
    return owners | {pid for pid, (parent, _, _) in table.items() if parent in owners}


def alive(pids: set[int]) -> set[int]:
    table = _proc_table()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


class DemoProcess:
    def __init__(self, *args: str, env: dict | None = None):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "django_db_tools", "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self.root: str | None = None
        self.pids: set[int] = set()
        self.err = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.err_reader = threading.Thread(target=self._read_err, daemon=True)
        self.err_reader.start()
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("sandbox: "):
                self.root = line.split(": ", 1)[1].strip()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.err = self.proc.stderr.read()

    def _watch(self) -> None:
        while self.proc.poll() is None:
            if self.root:
                self.pids |= server_pids(self.root)
            time.sleep(0.2)

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(re.search(pattern, line) for line in list(self.lines)):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.proc.kill()
        raise AssertionError(f"{pattern!r} never printed:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout: float) -> tuple[int, str, str, float]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        elapsed = time.monotonic() - self.started
        for thread in (self.reader, self.err_reader, self.watcher):
            thread.join(5)
        return self.proc.returncode, "\n".join(self.lines), self.err, elapsed

    def assert_cleaned_up(self) -> None:
        assert self.root and self.root.startswith(SANDBOX_PREFIX)
        assert not os.path.exists(self.root), f"{self.root} left behind"
        assert len(self.pids) >= 2, "the servers were never seen running"  # postmaster and pgbouncer at least
        assert alive(self.pids) == set(), "server processes left behind"
        assert server_pids(self.root) == set()
        assert "threads still running" not in "\n".join(self.lines)


def _numbers(lines: list[str], pattern: str) -> list[float]:
    return [float(m.group(1)) for line in lines for m in [re.search(pattern, line)] if m]


def _phase_block(output: str, name: str) -> list[str]:
    """The live-view lines printed during one phase."""
    start = output.index(f": {name} ===")
    ends = [i for i in (output.find("=== phase", start + 1), output.find("=== summary", start + 1)) if i != -1]
    return output[start : min(ends, default=len(output))].splitlines()


def test_demo_runs_every_phase_and_cleans_up():
    demo = DemoProcess("--phase-seconds", "6", "--interval", "1")
    status, output, err, elapsed = demo.finish(timeout=90)
    assert status == 0, output[-3000:] + err
    assert elapsed < 60
    for number, name in enumerate(PHASES, 1):
        assert f"=== phase {number}/4: {name} ===" in output
        assert f"] {name} ({number}/4)" in output  # at least one live view in each phase
    assert "all phases done" in output and f"cleaned up: servers stopped, {SANDBOX_PREFIX}" in output
    demo.assert_cleaned_up()

    healthy = _phase_block(output, "healthy")
    assert max(_numbers(healthy, r"postgres   connections (\d+)")) >= 1
    assert all(status == "OK" for status in re.findall(r"can_connect postgres (\w+)", "\n".join(healthy)))
    assert max(_numbers(healthy, r"browse ok (\d+)")) > 0

    leak = _phase_block(output, "leak")
    assert max(_numbers(leak, r"by app: .*shop-reports (\d+)")) == 10  # one connection per report thread
    assert max(_numbers(leak, r"leaked (\d+)")) >= 10
    assert max(_numbers(leak, r"sv_active (\d+)")) >= 10  # pinned server connections in session pooling
    # The profiles' budgets: ten report connections against a budget of four.
    assert any("CRITICAL: app=shop-reports holds 10 connections, over its budget of 4" in line for line in leak)

    stuck = _phase_block(output, "stuck")
    assert max(_numbers(stuck, r"idle_in_transaction (\d+)")) >= 1
    assert max(_numbers(stuck, r"waiting on a lock (\d+)")) >= 1
    assert max(_numbers(stuck, r"oldest idle in transaction (\d+(?:\.\d+)?)s")) >= 2

    # Each phase says what to watch for; the end of the leak says why its connections linger and waits them out.
    assert output.count("  watch for: ") == 4
    after_leak = output[output.index("leak over:") : output.index("=== phase 3/4")]
    assert "server_idle_timeout" in after_leak and "app=none" in after_leak
    assert "PgBouncer closed the session pool's server connections" in after_leak
    assert max(_numbers(stuck, r"by app: .*\bnone (\d+)"), default=0) < 10  # no leftovers of the leak
    for name in PHASES:  # a churn finding is explained where it shows
        block = "\n".join(_phase_block(output, name))
        assert "(churn" not in block or "why churn: " in block

    saturation = _phase_block(output, "saturation")
    assert max(_numbers(saturation, r"cl_waiting (\d+)")) >= 10
    assert max(_numbers(saturation, r"maxwait (\d+(?:\.\d+)?)s")) > 0
    assert max(_numbers(saturation, r"clients (\d+)/30")) >= 25
    block = "\n".join(saturation)
    assert re.search(r"health\s+CRITICAL", block), block
    # The page names the limit that was reached.
    assert re.search(r"CRITICAL: \d+ of 30 PgBouncer client connections in use", block), block

    # Whole findings, wrapped, never cut: the advice of max_client_conn is there to the end.
    live_view = output.split("=== summary")[0]
    assert all(len(line) <= live.WIDTH for line in live_view.splitlines() if line.startswith(live.INDENT))
    # as told for the demo's configuration (conn_max_age 60, no profile persistent)
    demo = parse({"pgbouncer": {}, "conn_max_age": 60})
    advice = fitted(BY_NAME["max_client_conn"].advice, demo).rstrip(".")
    assert advice in " ".join(line.strip() for line in live_view.splitlines())
    assert not re.search(r"\b1 slots\b", output)

    # The closing summary: each phase's worst finding and what to do, then what next.
    summary = output[output.index("=== summary") : output.index("cleaned up:")]
    flat = " ".join(line.strip() for line in summary.splitlines())
    assert re.search(r"^healthy +OK", summary, re.M)
    for name, words in (("leak", "(leaked"), ("stuck", "idle in transaction"), ("saturation", "max_client_conn")):
        section = flat[flat.index(f"{name} ") :]
        assert re.match(rf"{name} +(WARNING|CRITICAL) ", section), section[:200]
        assert words in section[: section.index("what to do:")]
    assert flat.count("what to do: ") == 4
    assert "close_old_connections()" in flat and "idle_in_transaction_session_timeout" in flat
    assert "next: " in flat and "./run check -c conf.yaml" in flat


def test_the_live_view_counts_in_words_and_wraps_whole_findings():
    stubs = [
        SimpleNamespace(name="django_db.postgres.connections_available", value=1, tags=[]),
        SimpleNamespace(name="django_db.postgres.connections", value=16, tags=["state:idle", "app:web"]),
    ]
    long = "CRITICAL: max_client_conn seen (97 from log): " + "advice " * 40 + "to the end."
    health = SimpleNamespace(name=live.HEALTH, status=2, message="WARNING: 16 of 17 usable slots in use; " + long)
    lines = live.render(live.Figures(stubs, [health]), "none")
    assert "(utilisation n/a, 1 slot left)" in lines[0]
    findings = lines[lines.index("  health     CRITICAL") + 1 :]
    assert findings[0] == live.INDENT + "WARNING: 16 of 17 usable slots in use"
    assert all(len(line) <= live.WIDTH for line in findings) and len(findings) >= 4
    assert " ".join(line.strip() for line in findings[1:]) == long.strip()
    assert [live.plural(n, "slot") for n in (0, 1, 2, None)] == ["0 slots", "1 slot", "2 slots", "n/a slots"]


@pytest.mark.parametrize(
    ("signum", "args", "when"),
    [
        (signal.SIGINT, ("--phase-seconds", "8", "--interval", "1"), r"\] leak \(2/4\)"),
        (signal.SIGTERM, ("--phase-seconds", "3", "--interval", "1"), r"\] saturation \(4/4\)"),
    ],
    ids=["sigint-during-leak", "sigterm-during-saturation"],
)
def test_a_signal_mid_run_cleans_everything_up(signum, args, when):
    demo = DemoProcess(*args)
    demo.wait_for(when, timeout=60)
    time.sleep(0.5)
    sent = time.monotonic()
    demo.proc.send_signal(signum)
    status, output, err, _ = demo.finish(timeout=40)
    assert time.monotonic() - sent < 30
    assert status == 130, output[-2000:] + err
    assert "interrupted" in output and "cleaned up: servers stopped" in output
    assert "Traceback" not in err
    demo.assert_cleaned_up()


def test_without_django_it_says_what_to_install():
    code = (
        "import sys; sys.modules['django'] = None\n"
        "from django_db_tools.cli import main\n"
        "sys.exit(main(['demo', '--fast']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "pip install 'datadog-django-db[demo]'" in result.stderr
    assert "sandbox:" not in result.stdout


def test_missing_server_binaries_print_the_install_hint():
    code = (
        "import sys\n"
        "from django_db_tools import sandbox\n"
        "def missing():\n"
        "    raise sandbox.SandboxError('initdb not found. ' + sandbox.INSTALL_HINT)\n"
        "sandbox.pg_bindir = missing\n"
        "from django_db_tools.cli import main\n"
        "sys.exit(main(['demo', '--fast']))\n"
    )
    before = set(glob.glob(SANDBOX_PREFIX + "*"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "initdb not found" in result.stderr and "apt-get install -y postgresql pgbouncer" in result.stderr
    assert "Traceback" not in result.stderr
    assert set(glob.glob(SANDBOX_PREFIX + "*")) <= before  # no folder made for nothing


def test_mysql_demo_on_mariadb():
    demo = DemoProcess("--mysql", "--phase-seconds", "4", "--interval", "2")
    code, output, err, _ = demo.finish(180)
    assert code == 0, err
    assert "health     CRITICAL" in output
    output = " ".join(output.split())  # findings are wrapped
    assert "mysql_too_many_connections seen" in output
    assert "the oldest MySQL transaction, of user=shop on db=shop" in output
    assert "conn_max_age=60 s is longer than MySQL's wait_timeout=30 s for user shop" in output
    assert demo.root and "django-db-mariadb-" in demo.root
    assert not os.path.exists(demo.root), f"{demo.root} left behind"
    assert demo.pids, "the server was never seen running"
    assert alive(demo.pids) == set(), "server processes left behind"
