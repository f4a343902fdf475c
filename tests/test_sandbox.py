"""The sandbox that the demo, benchmarks and tests share."""

from __future__ import annotations

import os
import tempfile

import pytest

from datadog_checks.django_db import sandbox as sandbox_module
from datadog_checks.django_db.sandbox import Sandbox, SandboxError


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
