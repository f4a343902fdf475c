"""`python -m django_db_tools check` against the suite's real PostgreSQL and PgBouncer."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml
from datadog_checks.base.stubs.common import MetricStub

from datadog_checks.django_db.check import DjangoDbCheck
from datadog_checks.django_db.config import parse
from django_db_tools import cli
from django_db_tools.sandbox import Sandbox, free_port

from .conftest import APP_PASSWORD

MONITOR_PASSWORD = Sandbox.MONITOR_PASSWORD
ROOT = Path(__file__).resolve().parent.parent


def write_conf(folder: Path, *instances: dict, name: str = "conf.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({"init_config": {}, "instances": list(instances)}))
    return path


def user_environment() -> dict:
    """The environment of a user's shell: without the switch the suite sets for the base package's stubs."""
    return {key: value for key, value in os.environ.items() if key != "DDEV_SKIP_GENERIC_TAGS_CHECK"}


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**user_environment(), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "django_db_tools", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def pg_only(sandbox: Sandbox) -> dict:
    return {"postgres": sandbox.postgres.instance(Sandbox.MONITOR_USER, MONITOR_PASSWORD), "tags": ["team:shop"]}


@pytest.fixture
def pgb_only(sandbox: Sandbox) -> dict:
    return {"pgbouncer": sandbox.pgbouncer.instance(Sandbox.MONITOR_USER)}


def test_text_output_lists_metrics_and_service_checks(tmp_path, sandbox, clients, pg_only):
    clients.many(3, app="clitext")
    conf = write_conf(tmp_path, pg_only)
    result = run_cli("check", "-c", str(conf), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("=== django_db, instance 1 of 1 (postgres 127.0.0.1:")
    assert "Runs: 1  Errors: 0  Warnings: 0" in result.stdout
    idle = [line for line in lines if line.strip().startswith("django_db.postgres.connections = ")]
    assert any("= 3 (gauge)" in line and "app:clitext" in line and "state:idle" in line for line in idle), idle
    assert "  django_db.postgres.max_connections = 100 (gauge)" in result.stdout
    assert any(line.strip().startswith("django_db.postgres.can_connect: OK") for line in lines)


def test_reads_conf_yaml_in_the_current_folder(tmp_path, pg_only):
    write_conf(tmp_path, pg_only)
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "django_db.postgres.max_connections = 100" in result.stdout


def test_table_output_is_aligned(tmp_path, pg_only):
    conf = write_conf(tmp_path, pg_only)
    result = run_cli("check", "-c", str(conf), "--table", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("METRIC"))
    assert header.split() == ["METRIC", "TYPE", "VALUE", "TAGS"]
    start = lines.index(header)
    rows = []
    for line in lines[start + 2 :]:
        if not line:
            break
        rows.append(line)
    assert any(row.startswith("django_db.postgres.max_connections ") for row in rows)
    type_col, value_col = header.index("TYPE"), header.index("VALUE")
    for row in rows:
        assert row[type_col - 2 : type_col] == "  " and row[type_col] != " ", row
        assert row[value_col - 2 : value_col] == "  " and row[value_col] != " ", row
    max_conn = next(row for row in rows if row.startswith("django_db.postgres.max_connections "))
    assert max_conn[type_col:].split()[:2] == ["gauge", "100"]
    checks_header = next(line for line in lines if line.startswith("SERVICE CHECK"))
    assert checks_header.split() == ["SERVICE", "CHECK", "STATUS", "TAGS", "MESSAGE"]
    status_col = checks_header.index("STATUS")
    can_connect = next(line for line in lines if line.startswith("django_db.postgres.can_connect"))
    assert can_connect[status_col:].startswith("OK ")


def test_json_output_has_the_agent_shapes(tmp_path, sandbox, pg_only, pgb_only):
    conf = write_conf(tmp_path, pg_only, pgb_only)
    result = run_cli("check", "-c", str(conf), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert isinstance(document, list) and len(document) == 2
    for item in document:
        assert set(item["aggregator"]) == {"metrics", "sketches", "service_checks", "events"}
        assert item["aggregator"]["sketches"] == [] and item["aggregator"]["events"] == []
        runner = item["runner"]
        assert runner["TotalRuns"] == 1 and runner["TotalErrors"] == 0 and runner["TotalWarnings"] == 0
        assert runner["CheckName"] == "django_db" and runner["CheckID"].startswith("django_db:")
        for metric in item["aggregator"]["metrics"]:
            assert set(metric) == {"metric", "points", "tags", "host", "type", "interval", "source_type_name"}
            assert metric["type"] in ("gauge", "rate", "count", "monotonic_count")
            [[timestamp, value]] = metric["points"]
            assert abs(timestamp - time.time()) < 60 and isinstance(value, float)
            assert isinstance(metric["tags"], list) and metric["host"]
        for check in item["aggregator"]["service_checks"]:
            assert set(check) == {"check", "host_name", "status", "timestamp", "message", "tags"}
            assert check["status"] in (0, 1, 2, 3)

    pg_metrics = {m["metric"]: m for m in document[0]["aggregator"]["metrics"]}
    max_conn = pg_metrics["django_db.postgres.max_connections"]
    assert max_conn["points"][0][1] == 100 and max_conn["type"] == "gauge"
    assert max_conn["tags"] == sorted([f"postgres_server:127.0.0.1:{sandbox.postgres.port}", "team:shop"])
    [pg_can_connect] = [c for c in document[0]["aggregator"]["service_checks"] if c["check"].endswith("can_connect")]
    assert pg_can_connect["check"] == "django_db.postgres.can_connect" and pg_can_connect["status"] == 0

    pgb_names = {m["metric"] for m in document[1]["aggregator"]["metrics"]}
    assert "django_db.pgbouncer.max_client_conn" in pgb_names
    assert not any(name.startswith("django_db.postgres.") for name in pgb_names)  # reset between instances
    assert {c["check"] for c in document[1]["aggregator"]["service_checks"]} >= {"django_db.pgbouncer.can_connect"}


def readme_example() -> dict:
    """The configuration the README shows for Django -> PgBouncer -> PostgreSQL."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("#### Django -> PgBouncer -> PostgreSQL") :]
    block = section[section.index("```yaml\n") + len("```yaml\n") : section.index("```\n", section.index("```yaml"))]
    return yaml.safe_load(block)


def test_each_topology_the_readme_configures_is_a_valid_instance():
    """Django -> PostgreSQL, -> PgBouncer -> PostgreSQL, several PgBouncers, MySQL, RDS: each block under
    Configuration is a configuration the check takes, ENC[] secrets and all."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Configuration") : text.index("#### Options worth knowing")]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) == 5
    sections = []
    for block in blocks:
        [instance] = yaml.safe_load(block)["instances"]
        settings = parse(instance)
        sections.append((settings.postgres is not None, len(settings.pgbouncers), settings.mysql is not None))
    assert sections == [(True, 0, False), (True, 1, False), (True, 2, False), (False, 0, True), (True, 0, False)]
    rds = parse(yaml.safe_load(blocks[4])["instances"][0]).postgres
    assert rds is not None and rds.auth is not None and rds.auth.kind == "aws" and rds.ssl["sslmode"] == "require"


def test_the_readme_example_runs_in_the_runner(tmp_path, sandbox):
    document = readme_example()
    instance = document["instances"][0]
    assert instance["tags"] == ["service:shop"]  # a generic tag key, which the Agent accepts
    # The README's servers, passwords and log file, replaced by the sandbox's; every other option as shown.
    instance["postgres"].update(sandbox.postgres.instance(Sandbox.MONITOR_USER, MONITOR_PASSWORD))
    instance["pgbouncer"].update(sandbox.pgbouncer.instance(Sandbox.MONITOR_USER))
    log = tmp_path / "pgbouncer.log"
    log.write_text("")
    instance["log_files"] = [str(log)]
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump(document))
    result = subprocess.run(
        [str(ROOT / "run"), "check", "-c", str(conf)],
        cwd=tmp_path, env=user_environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Runs: 1  Errors: 0  Warnings: 0" in result.stdout, result.stdout
    assert "forbidden tag" not in result.stdout + result.stderr
    metrics = [line for line in result.stdout.splitlines() if line.startswith("  django_db.")]
    assert any(line.startswith("  django_db.postgres.max_connections = 100 (gauge)") for line in metrics), metrics
    assert any(line.startswith("  django_db.pgbouncer.max_client_conn = ") for line in metrics), metrics
    assert all("service:shop" in line for line in metrics)


def test_check_times_runs_n_times(tmp_path, pg_only):
    conf = write_conf(tmp_path, pg_only)
    result = run_cli("check", "-c", str(conf), "-t", "3", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [item] = json.loads(result.stdout)
    assert item["runner"]["TotalRuns"] == 3
    assert item["runner"]["TotalServiceChecks"] == 3 * item["runner"]["ServiceChecks"]


def _traffic_through_pgbouncer(sandbox: Sandbox, stop: threading.Event) -> None:
    with psycopg.connect(
        host="127.0.0.1", port=sandbox.pgbouncer.port, user="app", password=APP_PASSWORD, dbname="appdb",
        application_name="cliload", autocommit=True, prepare_threshold=None,
    ) as conn:  # fmt: skip
        while not stop.is_set():
            conn.execute("SELECT 1")
            time.sleep(0.005)


def test_check_rate_shows_rates_after_two_runs(tmp_path, sandbox, pgb_only):
    conf = write_conf(tmp_path, pgb_only)
    stop = threading.Event()
    load = threading.Thread(target=_traffic_through_pgbouncer, args=(sandbox, stop))
    load.start()
    try:
        once = run_cli("check", "-c", str(conf), "--json", cwd=tmp_path)
        started = time.monotonic()
        twice = run_cli("check", "-c", str(conf), "-r", "--json", cwd=tmp_path)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        load.join(10)
    assert once.returncode == 0 and twice.returncode == 0, once.stderr + twice.stderr
    [first] = json.loads(once.stdout)
    assert not [m for m in first["aggregator"]["metrics"] if m["type"] == "rate"]  # one sample: no rate yet
    [second] = json.loads(twice.stdout)
    assert second["runner"]["TotalRuns"] == 2 and elapsed >= 1
    transactions = [
        m
        for m in second["aggregator"]["metrics"]
        if m["metric"] == "django_db.pgbouncer.stats.transactions" and "pgbouncer_db:appdb" in m["tags"]
    ]
    assert len(transactions) == 1 and transactions[0]["type"] == "rate"
    assert transactions[0]["points"][0][1] > 5  # transactions per second, not a running total
    assert transactions[0]["points"][0][1] < 1000


def test_flush_computes_like_the_agent():
    def run(ts: float, *stubs: MetricStub) -> cli.Run:
        return cli.Run(ts, 0.01, list(stubs), [], "", [])

    def stub(name: str, kind: int, value: float, tags: tuple = ("a:1",), first: bool = False) -> MetricStub:
        return MetricStub(name, kind, value, list(tags), "", None, first)

    first = run(100.0, stub("g", 0, 1), stub("r", 1, 10), stub("m", 3, 5), stub("c", 2, 1), stub("f", 3, 7, first=True))
    assert {m["name"]: m["value"] for m in cli.flush([first])} == {"g": 1, "c": 1, "f": 7}
    second = run(
        102.0, stub("g", 0, 4), stub("r", 1, 30), stub("m", 3, 9), stub("c", 2, 1), stub("c", 2, 2), stub("m2", 3, 1)
    )
    flushed = {m["name"]: m for m in cli.flush([first, second])}
    assert flushed["g"]["value"] == 4 and flushed["r"]["value"] == 10 and flushed["m"]["value"] == 4
    assert flushed["c"]["value"] == 3 and flushed["r"]["type"] == "rate"
    assert "m2" not in flushed  # first sample of a monotonic count: nothing to flush yet
    reset = run(104.0, stub("r", 1, 5))
    assert cli.flush([second, reset]) == []  # a counter reset drops the sample, as the Agent does


def test_missing_file_says_what_to_do(tmp_path):
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 2
    assert "configuration file not found: conf.yaml" in result.stderr
    assert "-c PATH" in result.stderr and "create ./conf.yaml" in result.stderr
    assert "conf.yaml.example" in result.stderr and result.stdout == ""
    other = run_cli("check", "-c", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert other.returncode == 2 and f"not found: {tmp_path / 'nope.yaml'}" in other.stderr


def test_unreadable_yaml_is_reported(tmp_path):
    (tmp_path / "conf.yaml").write_text("instances:\n  - postgres: {host: [\n")
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 2 and "conf.yaml is not valid YAML" in result.stderr
    (tmp_path / "conf.yaml").write_text("init_config: {}\ninstances: []\n")
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 2 and "`instances` must be a non-empty list" in result.stderr


def test_invalid_config_names_the_key(tmp_path, pg_only):
    bad = {**pg_only, "thresholds": {"utilization": {"warning": "lots"}}}
    conf = write_conf(tmp_path, pg_only, bad)
    result = run_cli("check", "-c", str(conf), cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr and "instance 2" in result.stderr
    assert "thresholds.utilization.warning" in result.stderr and "must be a number" in result.stderr
    assert result.stdout == ""  # nothing runs when any instance is invalid


def test_password_is_never_printed(tmp_path, sandbox, pg_only, pgb_only):
    wrong = {"postgres": {**pg_only["postgres"], "password": "wrong-pass-7f3a"}}
    conf = write_conf(tmp_path, pg_only, pgb_only, wrong)
    outputs = []
    for flags in ([], ["--table"], ["--json", "-r"]):
        result = run_cli("check", "-c", str(conf), *flags, cwd=tmp_path, env={"DD_LOG_LEVEL": "debug"})
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    assert "password authentication failed" in outputs[0]  # the failure is reported, the password is not
    # A password pasted into the wrong field is echoed by the configuration error: it is masked too.
    swapped = {"postgres": {**pg_only["postgres"], "port": MONITOR_PASSWORD}}
    result = run_cli("check", "-c", str(write_conf(tmp_path, swapped, name="swapped.yaml")), cwd=tmp_path)
    assert result.returncode == 2 and "postgres.port" in result.stderr and "********" in result.stderr
    outputs.append(result.stdout + result.stderr)
    for output in outputs:
        assert MONITOR_PASSWORD not in output and "wrong-pass-7f3a" not in output


def test_unreachable_server_is_a_critical_service_check(tmp_path):
    conf = write_conf(tmp_path, {"postgres": {"host": "127.0.0.1", "port": free_port(), "password": "x"}})
    result = run_cli("check", "-c", str(conf), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [item] = json.loads(result.stdout)
    [can_connect] = [c for c in item["aggregator"]["service_checks"] if c["check"] == "django_db.postgres.can_connect"]
    assert can_connect["status"] == 2 and can_connect["message"]


def test_a_failing_run_is_counted_not_raised(tmp_path, pg_only, monkeypatch):
    def broken(self, _):
        raise RuntimeError("boom in the check")

    monkeypatch.setattr(DjangoDbCheck, "check", broken)
    conf = write_conf(tmp_path, pg_only)
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["check", "-c", str(conf), "-t", "2", "--json"], out, err) == 1
    [item] = json.loads(out.getvalue())
    assert item["runner"]["TotalRuns"] == 2 and item["runner"]["TotalErrors"] == 2
    assert "boom in the check" in item["runner"]["LastError"]
    assert "2 of 2 runs failed" in err.getvalue()
    text_out = io.StringIO()
    assert cli.main(["check", "-c", str(conf)], text_out, io.StringIO()) == 1
    assert "Error in the last run:\n  boom in the check" in text_out.getvalue()


def test_no_subcommand_prints_usage(tmp_path):
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout.startswith("usage: python -m django_db_tools")
    assert "check" in result.stdout and "demo" in result.stdout
