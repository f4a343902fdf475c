"""The evaluation and the records are pure: importing them loads no database driver."""

from __future__ import annotations

import subprocess
import sys

PURE = (
    "datadog_checks.django_db.records",
    "datadog_checks.django_db.evaluate.model",
    "datadog_checks.django_db.evaluate.postgres",
    "datadog_checks.django_db.evaluate.pgbouncer",
    "datadog_checks.django_db.evaluate.health",
    "datadog_checks.django_db.evaluate.alignment",
    "datadog_checks.django_db.evaluate.signatures",
    "datadog_checks.django_db.evaluate.mysql",
)
DRIVERS = ("psycopg", "psycopg_c", "psycopg_binary", "pymysql", "requests")


def loaded_after_importing(*modules: str) -> set[str]:
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint(' '.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return set(result.stdout.split())


def test_the_evaluation_loads_no_driver():
    loaded = loaded_after_importing(*PURE)
    assert set(PURE) <= loaded
    assert not {name for name in loaded if name.split(".")[0] in DRIVERS}


def test_the_sources_do_load_their_driver():
    # The probe above would pass if it never saw a driver at all: the PostgreSQL source must show one.
    assert "psycopg" in loaded_after_importing("datadog_checks.django_db.sources.postgres")
