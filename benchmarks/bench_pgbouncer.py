"""How long one run of the check's PgBouncer side takes beside bare SHOW POOLS and SHOW STATS.

Starts a throwaway PostgreSQL and a PgBouncer with 200 [databases] entries aliasing one
database, connects a client through each alias once so that every pool exists, then prints
the median and p90 run time of DjangoDbCheck.check() with the pgbouncer section only, the
median round trips of `SHOW POOLS` and `SHOW STATS` on an open admin connection, and the
ratio of the check's median to the sum of the two.

Usage: python benchmarks/bench_pgbouncer.py [--runs N] [--pools N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import psycopg

os.environ.setdefault("DDEV_SKIP_GENERIC_TAGS_CHECK", "true")

from datadog_checks.base.stubs import aggregator
from timing import p90, timings

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.evaluate.pgbouncer import pgbouncer_metrics
from django_db_tools.sandbox import SUPERUSER, SUPERUSER_PASSWORD, Sandbox


def make_pools(box: Sandbox, count: int) -> list[str]:
    names = [f"alias{i:03d}" for i in range(count)]
    for name in names:
        box.pgbouncer.databases[name] = f"host=127.0.0.1 port={box.postgres.port} dbname=postgres"
    box.pgbouncer.reload()
    for name in names:
        with psycopg.connect(
            host="127.0.0.1", port=box.pgbouncer.port, user=SUPERUSER, password=SUPERUSER_PASSWORD, dbname=name,
            autocommit=True, prepare_threshold=None, application_name="bench-web", connect_timeout=5,
        ) as conn:  # fmt: skip
            conn.execute("SELECT 1").fetchall()
    return names


def measure(box: Sandbox, count: int, runs: int) -> None:
    names = make_pools(box, count)
    admin = psycopg.connect(
        host="127.0.0.1", port=box.pgbouncer.port, user=Sandbox.MONITOR_USER, password=Sandbox.MONITOR_PASSWORD,
        dbname="pgbouncer", autocommit=True, cursor_factory=psycopg.ClientCursor, connect_timeout=5,
    )  # fmt: skip
    check = DjangoDbCheck("django_db", {}, [{"pgbouncer": box.pgbouncer.instance(Sandbox.MONITOR_USER)}])

    def run_check() -> None:
        aggregator.reset()
        check.check(None)

    try:
        pools = admin.execute("SHOW POOLS").fetchall()
        assert len(pools) >= count, f"{len(pools)} pools, wanted {count}"
        check_times = timings(run_check, runs)
        seen = {t for m in aggregator.metrics("django_db.pgbouncer.pools.sv_idle") for t in m.tags}
        assert all(f"pgbouncer_db:{name}" in seen for name in names), "a pool is missing from the check's metrics"
        snapshot_times = timings(check.pgbouncer.snapshot, runs)
        snapshot = check.pgbouncer.snapshot()
        series = len(pgbouncer_metrics(snapshot, check.settings))
        evaluation_times = timings(lambda: pgbouncer_metrics(snapshot, check.settings), runs)
        pools_times = timings(lambda: admin.execute("SHOW POOLS").fetchall(), runs)
        stats_times = timings(lambda: admin.execute("SHOW STATS").fetchall(), runs)
    finally:
        check.cancel()
        admin.close()

    check_ms = statistics.median(check_times) * 1000
    pools_ms = statistics.median(pools_times) * 1000
    stats_ms = statistics.median(stats_times) * 1000
    print(f"PgBouncer side, {len(pools)} pools ({count} aliases + the admin console), {runs} runs after one warm-up")
    print(f"  check run          median {check_ms:8.2f} ms   p90 {p90(check_times) * 1000:8.2f} ms")
    print(f"  SHOW POOLS         median {pools_ms:8.3f} ms")
    print(f"  SHOW STATS         median {stats_ms:8.3f} ms")
    print(f"  check / (POOLS + STATS)   {check_ms / (pools_ms + stats_ms):6.1f}x")
    snapshot_ms = statistics.median(snapshot_times) * 1000
    evaluation_ms = statistics.median(evaluation_times) * 1000
    print("  where a run's time goes:")
    print(f"    snapshot (SHOW POOLS, STATS, DATABASES, LISTS)  median {snapshot_ms:8.2f} ms")
    print(f"    evaluation ({series} series)                 median {evaluation_ms:8.2f} ms")
    print(f"    submission and health (the rest)              about {check_ms - snapshot_ms - evaluation_ms:7.2f} ms")
    print(f"  snapshot / (POOLS + STATS)  {snapshot_ms / (pools_ms + stats_ms):6.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--pools", type=int, default=200)
    args = parser.parse_args()

    started = time.monotonic()
    # Each pool keeps one idle server connection: PostgreSQL needs a slot for every one.
    box = Sandbox(max_connections=args.pools + 100, max_client_conn=args.pools + 100, default_pool_size=5).start()
    try:
        measure(box, args.pools, args.runs)
    finally:
        box.close()
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
