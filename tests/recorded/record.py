"""Record the admin console's SHOW results from the PgBouncer installed here into pgbouncer_<version>.json.

Usage: python tests/recorded/record.py [--pgbouncer VERSION] [output folder]

VERSION is one of the builds django_db_tools.debian fetches (1.15, 1.24, 1.26); the machine's own
PgBouncer by default. Starts a throwaway PostgreSQL and PgBouncer, gives PgBouncer two application databases
(`appdb` through the `*` fallback with the default pool size, `sized` with an explicit
pool_size, reserve_pool and max_db_connections), runs a little traffic through both so pools and stats exist, keeps one
transaction open so a server is active, then reads every SHOW the check uses as user
`datadog` on the `pgbouncer` admin database.
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path

import psycopg

from datadog_checks.django_db.sources.pgbouncer import EVERY_RUN, ON_CONNECT, PER_RUN, parse_version
from django_db_tools import debian
from django_db_tools.sandbox import Sandbox

APP_PASSWORD = "app-secret"
SIZED_POOL = 7


def about(version: str) -> str:
    """What a recording says it was made from."""
    return (
        f"made from: a live PgBouncer {version} server, started by tests/recorded/record.py; "
        "columns and values as it answered, its temporary folder written as /sandbox"
    )


def plain(value: object) -> object:
    """A value as JSON keeps it: PgBouncer's numeric counters (Decimal here) as integers."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def show(conn: psycopg.Connection, what: str) -> dict:
    cursor = conn.execute("SHOW " + what)  # type: ignore[arg-type]
    if cursor.description is None:
        return {"columns": [], "rows": []}
    rows = [[plain(value) for value in row] for row in cursor.fetchall()]
    return {"columns": [c.name for c in cursor.description], "rows": rows}


def dump(results: dict) -> str:
    """JSON with one row a line, so a diff between versions reads column by column."""
    parts = []
    for name, value in results.items():
        if isinstance(value, dict):
            rows = ",\n".join("   " + json.dumps(row) for row in value["rows"])
            rows = f"[\n{rows}\n  ]" if rows else "[]"
            value_text = f'{{\n  "columns": {json.dumps(value["columns"])},\n  "rows": {rows}\n }}'
        else:
            value_text = json.dumps(value)
        parts.append(f" {json.dumps(name)}: {value_text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def prepare(box: Sandbox) -> None:
    """The role `app`, its databases `appdb` and `sized`, and PgBouncer's `sized` pool."""
    box.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
    box.psql("CREATE DATABASE appdb OWNER app")
    box.psql("CREATE DATABASE sized OWNER app")
    box.pgbouncer.users["app"] = APP_PASSWORD
    box.pgbouncer.databases["sized"] = (
        f"host=127.0.0.1 port={box.postgres.port} dbname=sized"
        f" pool_size={SIZED_POOL} reserve_pool=2 max_db_connections=30"
    )


def read(box: Sandbox) -> dict:
    """Traffic through both pools, one transaction left open, then every SHOW the check uses."""

    def client(dbname: str) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1", port=box.pgbouncer.port, user="app", password=APP_PASSWORD, dbname=dbname,
            autocommit=True, prepare_threshold=None, connect_timeout=5,
        )  # fmt: skip

    clients = [client("appdb"), client("appdb"), client("sized")]
    try:
        for conn in clients:
            for _ in range(5):
                conn.execute("SELECT 1").fetchall()
        clients[0].execute("BEGIN")
        clients[0].execute("SELECT 1").fetchall()  # holds a server: sv_active 1 on appdb
        with psycopg.connect(
            host="127.0.0.1", port=box.pgbouncer.port, user=Sandbox.MONITOR_USER, password=Sandbox.MONITOR_PASSWORD,
            dbname="pgbouncer", autocommit=True, cursor_factory=psycopg.ClientCursor, connect_timeout=5,
        ) as admin:  # fmt: skip
            return {name: show(admin, name) for name in (*PER_RUN, *EVERY_RUN.values(), *ON_CONNECT)}
    finally:
        for conn in clients:
            conn.close()


def record(box: Sandbox) -> dict:
    prepare(box)
    box.pgbouncer.reload()
    return read(box)


def main() -> None:
    args = sys.argv[1:]
    version = args[1] if args[:1] == ["--pgbouncer"] else None
    folder = Path(args[2 if version else 0]) if len(args) > (2 if version else 0) else Path(__file__).parent
    if version is None:
        record_into(folder, None)
        return
    with debian.runnable(debian.fetch(debian.PGBOUNCER[version])) as build:
        record_into(folder, build.command("pgbouncer"))


def record_into(folder: Path, program: list[str] | None) -> None:
    with Sandbox(default_pool_size=20, max_client_conn=100, pgbouncer_program=program) as box:
        root = box.root
        results = record(box)
    version = parse_version([" ".join(str(v) for v in row) for row in results["VERSION"]["rows"]])
    if version is None:
        raise SystemExit(f"no version in {results['VERSION']}")
    major_minor = ".".join(version.split(".")[:2])
    path = folder / f"pgbouncer_{major_minor}.json"
    text = dump({"_about": about(version), **results})
    path.write_text(text.replace(str(root), "/sandbox"))
    print(f"PgBouncer {version}: wrote {path}")


if __name__ == "__main__":
    main()
