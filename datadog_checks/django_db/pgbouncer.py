"""PgBouncer source: the admin console over one persistent connection, read by column name."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, LiteralString

import psycopg

from .config import Endpoint
from .connection import close_quietly, connect, deadline

ADMIN_DB = "pgbouncer"
PER_RUN: tuple[LiteralString, ...] = ("POOLS", "STATS", "DATABASES", "LISTS")
ON_CONNECT: tuple[LiteralString, ...] = ("CONFIG", "VERSION")

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class PgbSnapshot:
    pools: Rows
    stats: Rows
    databases: Rows
    lists: dict[str, int]
    config: dict[str, str]
    version: str | None
    new_connection: bool = False
    extra: dict[str, Rows] = field(default_factory=dict)

    @classmethod
    def from_results(cls, results: dict[str, Rows], new_connection: bool = False) -> PgbSnapshot:
        """Build a snapshot from SHOW results, each a list of rows keyed by column name."""
        config = {str(row.get("key")): str(row.get("value")) for row in results.get("CONFIG", [])}
        lists = {}
        for row in results.get("LISTS", []):
            try:
                lists[str(row["list"])] = int(row["items"])
            except (KeyError, TypeError, ValueError):
                continue
        return cls(
            pools=results.get("POOLS", []),
            stats=results.get("STATS", []),
            databases=results.get("DATABASES", []),
            lists=lists,
            config=config,
            version=parse_version(results.get("VERSION", [])),
            new_connection=new_connection,
        )


def parse_version(rows: Rows | list[str]) -> str | None:
    """``1.18.0`` from SHOW VERSION's row, or from the NOTICE older versions send instead."""
    for row in rows:
        text = " ".join(str(v) for v in row.values()) if isinstance(row, dict) else str(row)
        match = re.search(r"PgBouncer\s+(?:version\s+)?(\d+\.\d+(?:\.\d+)?)", text)
        if match:
            return match.group(1)
    return None


class PgBouncerSource:
    def __init__(self, endpoint: Endpoint, log: logging.Logger | logging.LoggerAdapter):
        self.endpoint = endpoint
        self.log = log
        self.conn: psycopg.Connection | None = None
        self.cached: dict[str, Rows] = {}
        self.notices: list[str] = []

    def close(self) -> None:
        close_quietly(self.conn)
        self.conn = None

    def snapshot(self) -> PgbSnapshot:
        """Read the console; any failure closes the connection, to be opened again next run."""
        try:
            return self._snapshot()
        except BaseException:
            self.close()
            raise

    def _snapshot(self) -> PgbSnapshot:
        new = self.conn is None or self.conn.closed
        if new:
            # The console speaks the simple query protocol only: client-side binding, no prepares.
            self.conn = connect(self.endpoint, cursor_factory=psycopg.ClientCursor, prepare_threshold=None)
            self.notices = []
            self.conn.add_notice_handler(lambda diag: self.notices.append(diag.message_primary or ""))
        conn = self.conn
        assert conn is not None
        results: dict[str, Rows] = {}
        with deadline(conn, self.endpoint.query_timeout):
            if new:
                self.cached = {name: self._show(conn, name) for name in ON_CONNECT}
                if not self.cached["VERSION"]:  # before 1.12 the version came as a NOTICE
                    self.cached["VERSION"] = [{"version": notice} for notice in self.notices]
            for name in PER_RUN:
                results[name] = self._show(conn, name)
        return PgbSnapshot.from_results({**self.cached, **results}, new_connection=new)

    @staticmethod
    def _show(conn: psycopg.Connection, what: LiteralString) -> Rows:
        cursor = conn.execute("SHOW " + what)
        if cursor.description is None:
            return []
        names = [column.name for column in cursor.description]
        return [dict(zip(names, row, strict=False)) for row in cursor.fetchall()]
