"""The two ways the check reaches an Agent, run the way an Agent would run them.

- the wheel, installed with --no-deps into a fresh virtualenv that holds only what the Agent embeds
  (datadog-checks-base and psycopg 3.2), as `datadog-agent integration install -w` does;
- the checks.d copy from scripts/build_checksd.py, loaded by check name with only checks.d on sys.path.

Both run once against the suite's PostgreSQL.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENT_PACKAGES = ["datadog-checks-base[deps]==38.5.0", "psycopg[binary]>=3.2,<3.3"]
PIP = ["-m", "pip", "--disable-pip-version-check", "-q"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["DDEV_SKIP_GENERIC_TAGS_CHECK"] = "true"
    return env


def run(*args: object, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def base_python() -> str:
    """The interpreter the suite's virtualenv was made from."""
    return getattr(sys, "_base_executable", None) or sys.executable


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, *PIP, "wheel", "--no-deps", "-w", out, ROOT)
    (built,) = out.glob("datadog_django_db-*.whl")
    return built


@pytest.fixture(scope="session")
def agent_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with the Agent's embedded packages and nothing of the check."""
    venv = tmp_path_factory.mktemp("agent") / "venv"
    run(base_python(), "-m", "venv", venv)
    run(venv_python(venv), *PIP, "install", *AGENT_PACKAGES, timeout=300)
    return venv


@pytest.fixture(scope="session")
def wheel_venv(agent_venv: Path, wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the Agent's set with the wheel installed as `datadog-agent integration install -w` does."""
    venv = tmp_path_factory.mktemp("agent-wheel") / "venv"
    shutil.copytree(agent_venv, venv, symlinks=True)
    run(venv_python(venv), *PIP, "install", "--no-deps", "--no-index", wheel)
    return venv


@pytest.fixture(scope="session")
def checksd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dropin")
    run(sys.executable, ROOT / "scripts" / "build_checksd.py", "--out", out)
    return out


@pytest.fixture
def postgres_instance(sandbox, clients) -> dict:
    # The check counts client backends other than its own: keep one open so there is something to count.
    clients.connect(app="dropin")
    return sandbox.instance(False)


def wheel_members(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def test_wheel_holds_the_check_package_only(wheel: Path) -> None:
    members = wheel_members(wheel)
    payload = [m for m in members if ".dist-info/" not in m]
    assert payload, members
    assert all(m.startswith("datadog_checks/django_db/") for m in payload), payload
    # datadog-checks-base owns the namespace's __init__.py; a second copy would clobber it on install.
    assert "datadog_checks/__init__.py" not in members
    assert "datadog_checks/django_db/__init__.py" in members
    assert "datadog_checks/django_db/data/conf.yaml.example" in members
    assert "datadog_checks/django_db/data/auto_conf.yaml" in members
    assert not [m for m in members if "__pycache__" in m or m.endswith(".pyc")]


def test_wheel_depends_on_datadog_checks_base_only(wheel: Path) -> None:
    required = [r for r in wheel_requirements(wheel) if "extra ==" not in r]
    assert len(required) == 1 and required[0].startswith("datadog-checks-base"), required


# Loads the check the way the Agent's Python loader does: by check name, the package (argv[3]) first and
# the checks.d module second, then the first AgentCheck subclass in dir(module) that has no subclasses.
LOADER = textwrap.dedent(
    """
    import importlib, json, os, sys
    checks_d, name, package, instance = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    check_name = sys.argv[5] if len(sys.argv) > 5 else name
    sys.path.insert(0, checks_d)
    from datadog_checks.base import AgentCheck
    from datadog_checks.base.stubs import aggregator

    try:
        importlib.import_module(package)
        package_importable = True
    except ImportError:
        package_importable = False
    module = importlib.import_module(name)
    candidates = [
        getattr(module, attr) for attr in sorted(dir(module))
        if isinstance(getattr(module, attr), type) and issubclass(getattr(module, attr), AgentCheck)
        and not getattr(module, attr).__subclasses__()
    ]
    check = candidates[0](check_name, {}, [instance])
    error = check.run()
    print(json.dumps({
        "package_importable": package_importable,
        "module_file": module.__file__,
        "class": candidates[0].__module__ + "." + candidates[0].__qualname__,
        "error": error,
        "metrics": sorted(aggregator.metric_names),
        "can_connect": [sc.status for sc in aggregator.service_checks(check_name + ".postgres.can_connect")],
    }))
    """
)


def test_wheel_runs_in_the_agents_environment(wheel_venv: Path, postgres_instance: dict, tmp_path: Path) -> None:
    python = venv_python(wheel_venv)
    empty_checks_d = tmp_path / "checks.d"
    empty_checks_d.mkdir()
    result = run(
        python, "-I", "-c", LOADER, empty_checks_d, "datadog_checks.django_db", "datadog_checks.django_db",
        json.dumps(postgres_instance), "django_db", cwd=tmp_path,
    )  # fmt: skip
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["module_file"]).is_relative_to(wheel_venv), report["module_file"]
    assert report["class"] == "datadog_checks.django_db.check.DjangoDbCheck"
    assert report["error"] == "", report["error"]
    assert "django_db.postgres.connections" in report["metrics"], report["metrics"]
    assert report["can_connect"] == [0]


def test_wheel_and_checksd_copy_carry_the_same_modules(wheel: Path, checksd: Path) -> None:
    prefix = "datadog_checks/django_db/"
    in_wheel = {m[len(prefix) :] for m in wheel_members(wheel) if m.startswith(prefix) and m.endswith(".py")}
    copy = checksd / "checks.d" / "django_db_check"
    in_copy = {str(p.relative_to(copy)) for p in copy.rglob("*.py") if "__pycache__" not in p.parts}
    assert in_wheel == in_copy
    assert "check.py" in in_wheel and "records.py" in in_wheel


def test_wheel_carries_no_development_tools(wheel: Path) -> None:
    members = wheel_members(wheel)
    assert not [m for m in members if "django_db_tools" in m or m.endswith(("__main__.py", "cli.py", "sandbox.py"))]
    assert not [m for m in members if "/demo/" in m]


def test_checksd_dropin_runs_without_the_package(
    checksd: Path, agent_venv: Path, postgres_instance: dict, tmp_path: Path
) -> None:
    checks_d = checksd / "checks.d"
    assert (checks_d / "django_db.py").is_file()
    # -I: neither the working directory, PYTHONPATH nor user site-packages; the venv has no copy of the check.
    result = run(
        venv_python(agent_venv),
        "-I",
        "-c",
        LOADER,
        checks_d,
        "django_db",
        "datadog_checks.django_db",
        json.dumps(postgres_instance),
        cwd=tmp_path,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["package_importable"] is False
    assert Path(report["module_file"]) == checks_d / "django_db.py"
    assert report["class"].endswith(".DjangoDbCheck")
    assert report["error"] == "", report["error"]
    assert "django_db.postgres.connections" in report["metrics"], report["metrics"]
    assert report["can_connect"] == [0]


def test_checksd_dropin_ships_the_configuration(checksd: Path) -> None:
    conf_d = checksd / "conf.d" / "django_db.d"
    data = ROOT / "datadog_checks" / "django_db" / "data"
    for name in ("conf.yaml.example", "auto_conf.yaml"):
        assert (conf_d / name).read_text() == (data / name).read_text()


@pytest.fixture(scope="module")
def build_script() -> Iterator:
    spec = importlib.util.spec_from_file_location("build_checksd", ROOT / "scripts" / "build_checksd.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module


def test_build_makes_the_packages_own_imports_relative(build_script) -> None:
    source = textwrap.dedent(
        """
        from datadog_checks.base import AgentCheck
        from datadog_checks.django_db.config import (
            Settings,
            parse as parse_config,
        )
        from datadog_checks.django_db import records
        import datadog_checks.django_db.check as wiring
        """
    )
    top = build_script.rewrite_imports(source, 0, "x.py")
    assert "from datadog_checks.base import AgentCheck" in top
    assert "from .config import Settings, parse as parse_config" in top
    assert "from . import records" in top
    assert "from . import check as wiring" in top
    assert "datadog_checks.django_db" not in top
    nested = build_script.rewrite_imports("from datadog_checks.django_db.evaluate.model import Status\n", 1, "sub/x.py")
    assert nested == "from ..evaluate.model import Status\n"


def test_build_refuses_imports_it_cannot_make_relative(build_script) -> None:
    with pytest.raises(build_script.BuildError):
        build_script.rewrite_imports("import datadog_checks.django_db\n", 0, "x.py")


def test_checksd_copy_leaves_out_the_development_runner(checksd: Path) -> None:
    copy = checksd / "checks.d" / "django_db_check"
    assert (copy / "check.py").is_file() and (copy / "config_models" / "instance.py").is_file()
    assert not (copy / "__main__.py").exists()


# Constructs the check as the Agent does and reports what construction raised.
CONSTRUCT = textwrap.dedent(
    """
    import importlib, json, sys
    sys.path.insert(0, sys.argv[1])
    module = importlib.import_module(sys.argv[2])
    try:
        module.DjangoDbCheck("django_db", {}, [json.loads(sys.argv[3])])
        print(json.dumps({"raised": None}))
    except Exception as e:
        print(json.dumps({"raised": type(e).__name__, "message": str(e)}))
    """
)


def test_wheel_and_checksd_copy_refuse_a_bad_instance_at_construction(
    wheel_venv: Path, checksd: Path, agent_venv: Path, postgres_instance: dict, tmp_path: Path
) -> None:
    """Both validate the configuration models when constructed: the copy once skipped them."""
    bad = json.dumps({"postgres": {**postgres_instance["postgres"], "password": 12345}})
    empty = tmp_path / "empty"
    empty.mkdir()
    for python, checks_d, module in (
        (venv_python(wheel_venv), empty, "datadog_checks.django_db"),
        (venv_python(agent_venv), checksd / "checks.d", "django_db"),
    ):
        result = run(python, "-I", "-c", CONSTRUCT, checks_d, module, bad, cwd=tmp_path)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["raised"] == "ConfigurationError", (module, report)
        assert "postgres.password" in report["message"] and "12345" not in report["message"]
