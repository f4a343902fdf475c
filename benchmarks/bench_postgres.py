"""How long one run of the check's PostgreSQL side takes beside a bare pg_stat_activity count.

Starts a throwaway PostgreSQL (max_connections 1100), opens 100 then 1,000 idle client
connections, and at each level prints the median and p90 run time of DjangoDbCheck.check()
with the postgres section only, the median round trip of `SELECT count(*) FROM
pg_stat_activity` on an open connection, and the ratio of the two medians.

Usage: python benchmarks/bench_postgres.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import psycopg

os.environ.setdefault("DDEV_SKIP_GENERIC_TAGS_CHECK", "true")

from datadog_checks.base.stubs import aggregator
from timing import p90, timings

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.sandbox import Sandbox

LEVELS = (100, 1000)
MAX_CONNECTIONS = 1100


def raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def measure(box: Sandbox, runs: int) -> None:
    check = DjangoDbCheck("django_db", {}, [box.instance(False)])

    def run_check() -> None:
        aggregator.reset()
        check.check(None)

    bare = psycopg.connect(box.postgres.dsn(), autocommit=True, application_name="bench-bare")
    clients: list[psycopg.Connection] = []
    print(f"PostgreSQL side, max_connections {MAX_CONNECTIONS}, {runs} runs after one warm-up")
    header = ("idle clients", "counted", "check median", "check p90", "bare median", "ratio", "snapshot", "ratio")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (12, 8, 13, 10, 12, 7, 10, 7), strict=True)))
    try:
        for level in LEVELS:
            while len(clients) < level:
                clients.append(
                    psycopg.connect(
                        box.postgres.dsn(), autocommit=True, application_name=f"bench-web-{len(clients) % 5}"
                    )
                )
            check_times = timings(run_check, runs)
            bare_times = timings(lambda: bare.execute("SELECT count(*) FROM pg_stat_activity").fetchone(), runs)
            # The I/O part alone: the check's queries on its open connection.
            snapshot_times = timings(lambda: check.postgres.snapshot(check._last_server_time), runs)
            seen = sum(m.value for m in aggregator.metrics("django_db.postgres.connections"))
            assert seen >= level, f"the check counted {seen} connections, {level} are open"
            check_ms = statistics.median(check_times) * 1000
            bare_ms = statistics.median(bare_times) * 1000
            snapshot_ms = statistics.median(snapshot_times) * 1000
            print(
                f"{level:>12} {seen:>8.0f} {check_ms:>10.2f} ms {p90(check_times) * 1000:>7.2f} ms"
                f" {bare_ms:>9.3f} ms {check_ms / bare_ms:>6.1f}x {snapshot_ms:>7.2f} ms {snapshot_ms / bare_ms:>6.1f}x"
            )
    finally:
        check.cancel()
        for conn in clients:
            conn.close()
        bare.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    raise_open_files(MAX_CONNECTIONS + 200)

    started = time.monotonic()
    box = Sandbox(max_connections=MAX_CONNECTIONS).start(with_pgbouncer=False)
    try:
        measure(box, args.runs)
    finally:
        box.close()
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
