"""The cost benchmark keeps working: it runs on tiny levels against real servers and prints every figure."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cost.py"
NUMBER = r"\d+(?:\.\d+)?"
MS = rf"{NUMBER} ms \(p90 {NUMBER}\)"
RATIOS = rf"{NUMBER}x \({NUMBER}x to {NUMBER}x\)"  # the median of the sets of connections, their range


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cost", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def figure(label: str, value: str, target: str | None) -> str:
    """A figure line's pattern: with a target, PASS or FAIL; without one, reported only."""
    end = rf"{re.escape(target)}\s+(PASS|FAIL)" if target else r"-\s+-"
    return rf"(?m)^  {re.escape(label)}\s+{value}\s+{end}$"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench()


def test_bench_prints_every_figure_beside_its_target(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    levels = ["--clients", "3,6,9", "--pools", "2,4", "--pgbouncer-clients", "4,8", "--sets", "2"]
    bench.main(["--runs", "3", "--warmup", "1", *levels])
    out = capsys.readouterr().out
    expected = [
        figure("series per run (metric name + tags)", r"\d+ \(PostgreSQL \d+, PgBouncer \d+, findings .*\)", "<= 80"),
        figure("round trips per run to PostgreSQL", r"\d+ \(most in 3 runs .*\)", "== 1"),
        figure("SHOW statements per run to PgBouncer", r"\d+ \(most in 3 runs .*\)", "<= 4"),
        figure("new PostgreSQL connections in 3 runs", r"\d+ \(.*\)", "0"),
        figure("new PgBouncer connections in 3 runs", r"\d+ \(.*\)", "0"),
        figure("2 pools: none folded", rf"{NUMBER} KiB", None),
        figure("4 pools: none folded", rf"{NUMBER} KiB = {NUMBER}x the 2-pool peak", "<= 2x"),
        figure("2 pools: series / pools", rf"{NUMBER} \(\d+ series\)", None),
        figure("4 pools: series / pools", rf"{NUMBER} \(\d+ series; {NUMBER} a pool more from 2 pools\)", "<= 2"),
    ]
    for pools, target in ((2, None), (4, "<= 0.5x")):
        expected += [
            figure(f"{pools} pools: run time, no-op aggregator", rf"{MS} / official {MS} = {NUMBER}x", None),
            figure(f"{pools} pools: run time, stub aggregator", rf"{MS} / official {MS} = {NUMBER}x", target),
        ]
        expected += [
            figure(f"{pools} pools: bare SHOW POOLS + SHOW STATS", rf"{MS}; the check {NUMBER}x", None),
            figure(f"{pools} pools: defaults (past 50, folded)", rf"{NUMBER} KiB", None),
        ]
    for clients, target in ((3, "<= 2x"), (6, None), (9, "<= 1.3x")):
        expected += [
            figure(f"{clients} idle clients: run time, no-op aggregator", rf"{MS} / bare {MS} = {RATIOS}", target),
            figure(f"{clients} idle clients: run time, stub aggregator", rf"{MS} = {RATIOS}", target),
        ]
    expected.append(
        figure("3 idle clients: its statement and submissions alone, stub aggregator", rf"{MS} = {RATIOS}", None)
    )
    for clients, target in ((4, None), (8, "<= 2x")):
        expected += [
            figure(f"{clients} clients: run time, no-op aggregator", rf"{MS} / bare {MS} = {NUMBER}x", target),
            figure(f"{clients} clients: run time, stub aggregator", rf"{MS} = {NUMBER}x bare", None),
            figure(f"{clients} clients: peak memory, no-op aggregator", rf"{NUMBER} KiB", None),
        ]
    expected += [
        figure("4 clients: series", r"\d+ \(4 clients counted; \d+ django_db.finding apart\)", None),
        r"(?m)^  8 clients: series\s+\d+ \(8 clients counted; \d+ django_db.finding apart\)\s+== \d+\s+(PASS|FAIL)$",
        figure("8 distinct names: app values, series", r"\d+ app values, \d+ series", "<= 51"),
    ]
    missing = [pattern for pattern in expected if not re.search(pattern, out)]
    assert not missing, f"lines missing from the benchmark's output:\n{missing}\n\n{out}"
    judged = len(re.findall(r"(?m) (?:PASS|FAIL)$", out))
    assert judged == 15
    assert re.search(rf"(?m)^\d+ of {judged} figures meet their target$", out)
    assert re.search(r"(?m)^total \d+ s$", out.rstrip().splitlines()[-1])


def test_round_trips_are_counted_from_the_trace(bench: ModuleType) -> None:
    """A pipelined exchange is one round trip; each simple query answered is another."""
    lines = [
        'F\t744\tParse\t "" "',
        "SELECT 1",  # the rest of a message spread over lines
        '" 0',
        'F\t9\tExecute\t "" 0',
        "F\t4\tSync",
        "F\t4\tFlush",
        "B\t4\tParseComplete",
        "B\t5\tReadyForQuery\t I",
        'F\t15\tQuery\t "SHOW POOLS"',
        "B\t5\tReadyForQuery\t I",
        'F\t15\tQuery\t "SHOW STATS"',
        "B\t5\tReadyForQuery\t I",
        "F\t4\tTerminate",
    ]
    assert bench.exchanges(lines) == bench.Exchanges(round_trips=3, sync_or_query=3)


def test_the_silent_check_submits_nothing(bench: ModuleType) -> None:
    """Its submission methods do nothing: the figures with the no-op aggregator are the check's own cost."""
    from datadog_checks.base.stubs import aggregator

    check = bench.SilentCheck("django_db", {}, [{"pgbouncer": {"host": "127.0.0.1", "port": 1, "username": "x"}}])
    aggregator.reset()
    check.check(None)  # nothing listens: a CRITICAL can_connect and an error count, both to the no-op methods
    check.cancel()
    assert aggregator.metric_names == []
    assert aggregator.service_check_names == []


def test_the_benchmark_stops_when_it_cannot_reach_the_checks_connection(bench: ModuleType) -> None:
    """Round trips are counted on the connection the check keeps: without one, the benchmark says where to look."""
    from datadog_checks.django_db import DjangoDbCheck

    check = DjangoDbCheck("django_db", {}, [{"postgres": {"host": "127.0.0.1", "port": 1, "username": "x"}}])
    with pytest.raises(bench.BenchmarkBroken, match=r"DjangoDbCheck\.postgres\.conn .*kept_connection\(\)"):
        bench.kept_connection(check, "postgres")  # not run yet: no connection
    with pytest.raises(bench.BenchmarkBroken, match=r"DjangoDbCheck\.pgbouncer\.conn"):
        bench.kept_connection(check, "pgbouncer")  # no such section
