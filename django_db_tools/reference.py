"""The reference stack a run's cost is measured and documented on.

One instance with both sections. PostgreSQL with 20 client connections: `web` 10 on database `shop`,
2 of them running a query; `celery` 6 on `reports`, 2 of them idle in a transaction; `admin` 4 on
`billing`. PgBouncer with 3 pools, 2 clients of the database's application on each: `shop` and
`billing` in transaction mode, `reports` in session mode. ``ReferenceStack.settled`` waits until both
servers show exactly that, so that what a run counts does not depend on a client being on its way.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from .sandbox import SUPERUSER, SUPERUSER_PASSWORD, Sandbox

PASSWORD = "reference-secret"  # noqa: S105 - a throwaway local server
# (application, database, connections to PostgreSQL, of them active, of them idle in a transaction)
DIRECT = (("web", "shop", 10, 2, 0), ("celery", "reports", 6, 0, 2), ("admin", "billing", 4, 0, 0))
# (database, pool_mode, application of its clients); 2 clients on each
POOLED = (("shop", "transaction", "web"), ("billing", "transaction", "admin"), ("reports", "session", "celery"))
CLIENTS_PER_POOL = 2
WARM_UP_RUNS = 3


class ReferenceStack:
    """The reference stack's clients on a started Sandbox (its PgBouncer with no `*` entry)."""

    def __init__(self, box: Sandbox):
        self.box = box
        self.conns: list[psycopg.Connection[Any]] = []
        self.direct: list[int] = []  # backend pids of the connections straight to PostgreSQL

    def open(self) -> ReferenceStack:
        box = self.box
        for app, db, *_ in DIRECT:
            box.psql(f"CREATE ROLE {app} LOGIN PASSWORD '{PASSWORD}'")
            box.psql(f"CREATE DATABASE {db} OWNER {app}")
            box.pgbouncer.users[app] = PASSWORD
        box.pgbouncer.databases.clear()
        for db, mode, _ in POOLED:
            box.pgbouncer.databases[db] = f"host=127.0.0.1 port={box.postgres.port} dbname={db} pool_mode={mode}"
        box.pgbouncer.reload()
        try:
            for app, db, count, active, in_transaction in DIRECT:
                for i in range(count):
                    conn = self._connect(box.postgres.port, db, app)
                    self.direct.append(conn.info.backend_pid)
                    if i < active:
                        conn.pgconn.send_query(b"SELECT pg_sleep(3600)")  # running until the stack closes
                    elif i < active + in_transaction:
                        conn.execute("BEGIN")
                        conn.execute("SELECT 1")
            for db, _, app in POOLED:
                for _ in range(CLIENTS_PER_POOL):
                    self._connect(box.pgbouncer.port, db, app).execute("SELECT 1")
            self.settled()
        except BaseException:
            self.close()
            raise
        return self

    def _connect(self, port: int, db: str, app: str) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            host="127.0.0.1", port=port, dbname=db, user=app, password=PASSWORD, application_name=app,
            autocommit=True, prepare_threshold=None, connect_timeout=10,
        )  # fmt: skip
        self.conns.append(conn)
        return conn

    def settled(self, timeout: float = 20) -> None:
        """Wait until PostgreSQL shows the 20 clients in their states and PgBouncer its 6 clients on 3 pools."""
        wanted_pg = {("web", "active"): 2, ("web", "idle"): 8, ("celery", "idle in transaction"): 2,
                     ("celery", "idle"): 4, ("admin", "idle"): 4}  # fmt: skip
        wanted_pools = {db for db, _, _ in POOLED}
        deadline = time.monotonic() + timeout
        while True:
            seen_pg = self._pg_states()
            seen_clients, seen_pools = self._pgbouncer_clients()
            if seen_pg == wanted_pg and seen_clients == CLIENTS_PER_POOL * len(POOLED) and seen_pools == wanted_pools:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the reference stack did not settle: {seen_pg}, {seen_clients}, {seen_pools}")
            time.sleep(0.2)

    def _pg_states(self) -> dict[tuple[str, str], int]:
        """(application, state) of the stack's own connections to PostgreSQL, by their backends' pids."""
        pids = ",".join(str(pid) for pid in self.direct)
        rows = self.box.psql(
            f"SELECT application_name, state, count(*) FROM pg_stat_activity WHERE pid IN ({pids}) GROUP BY 1, 2"
        )
        found: dict[tuple[str, str], int] = {}
        for line in rows.splitlines():
            app, state, count = line.split("|")
            found[(app, state)] = int(count)
        return found

    def _pgbouncer_clients(self) -> tuple[int, set[str]]:
        with psycopg.connect(
            host="127.0.0.1", port=self.box.pgbouncer.port, user=SUPERUSER, password=SUPERUSER_PASSWORD,
            dbname="pgbouncer", autocommit=True, cursor_factory=psycopg.ClientCursor, connect_timeout=5,
        ) as admin:  # fmt: skip
            cursor = admin.execute("SHOW CLIENTS")
            names = [d.name for d in cursor.description or ()]
            clients = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
            cursor = admin.execute("SHOW POOLS")
            names = [d.name for d in cursor.description or ()]
            pools = {dict(zip(names, row, strict=True))["database"] for row in cursor.fetchall()}
        apps = {app for _, _, app in POOLED}
        return sum(1 for c in clients if c.get("application_name") in apps), pools - {"pgbouncer"}

    def close(self) -> None:
        for conn in self.conns:
            if conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE:
                conn.cancel()
            conn.close()
        self.conns.clear()
