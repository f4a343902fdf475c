"""The sandbox that the demo, benchmarks and tests share."""

from __future__ import annotations

import os
import tempfile

import pytest

from django_db_tools import sandbox as sandbox_module
from django_db_tools.sandbox import Sandbox, SandboxError


def test_nothing_is_left_behind_without_postgres(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("DJANGO_DB_PG_BIN", str(empty))
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(sandbox_module.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SandboxError, match="apt-get install"):
        Sandbox()
    assert os.listdir(tmp_path) == ["bin"]


def test_close_removes_everything(sandbox):
    box = Sandbox(max_connections=10).start()
    root = box.root
    pid = box.pgbouncer.proc.pid
    box.close()
    assert not root.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_free_ports_are_never_handed_out_twice(monkeypatch):
    # The kernel may offer a port again while the first taker has not bound it yet.
    offered = iter([5001, 5001, 5002])

    class FakeSocket:
        def __init__(self, *args):
            self.port = next(offered)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            pass

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(sandbox_module.socket, "socket", FakeSocket)
    monkeypatch.setattr(sandbox_module, "_HANDED_OUT", set())
    assert [sandbox_module.free_port(), sandbox_module.free_port()] == [5001, 5002]
