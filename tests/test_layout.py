"""The evaluation and the records are pure: importing them loads no database driver."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import datadog_checks.django_db.evaluate as evaluate

# Every evaluation module, the records the sources return and the settings they all read.
PURE = (
    "datadog_checks.django_db.records",
    "datadog_checks.django_db.settings",
    *(f"{evaluate.__name__}.{module.name}" for module in pkgutil.iter_modules(evaluate.__path__)),
)
DRIVERS = ("psycopg", "psycopg_c", "psycopg_binary", "pymysql", "requests", "boto3", "botocore", "azure")
# Nor what builds the settings: the configuration models and the Agent's base package.
BUILDERS = (
    "pydantic",
    "datadog_checks.base",
    "datadog_checks.django_db.config",
    "datadog_checks.django_db.config_models",
)


def loaded_after_importing(*modules: str) -> set[str]:
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint(' '.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return set(result.stdout.split())


def test_the_evaluation_loads_no_driver():
    loaded = loaded_after_importing(*PURE)
    assert set(PURE) <= loaded
    assert len(PURE) > 12  # the walk found the evaluation's modules
    assert not {name for name in loaded if name.split(".")[0] in DRIVERS}
    assert not {name for name in loaded if any(name == b or name.startswith(b + ".") for b in BUILDERS)}


def test_the_sources_do_load_their_driver():
    # The probe above would pass if it never saw a driver at all: the PostgreSQL source must show one.
    assert "psycopg" in loaded_after_importing("datadog_checks.django_db.sources.postgres")
