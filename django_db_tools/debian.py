"""PgBouncer, MariaDB and MySQL builds from other Debian suites, for running the tests on them.

The machine's own packages give one version of each (PgBouncer 1.18 and MariaDB 10.11 on Debian 12);
Debian's archive serves the others in other suites: bullseye (PgBouncer 1.15, MariaDB 10.5), trixie
(PgBouncer 1.24, MariaDB 11.8) and sid (PgBouncer 1.26, Oracle MySQL's ``mysql-server-core``).
A build is fetched by suite and package name, never by exact version (suites move), with a private
apt configuration (``apt-get -c FILE``: its own sources list, package lists and download folder, no
status file, none of the machine's hooks), and unpacked with ``dpkg -x`` into
``~/.cache/django-db/debian/<suite>/<package>/`` (``$XDG_CACHE_HOME`` if set). Nothing is installed
and the machine's apt configuration is left alone. A second call, from this process or another,
finds the build there.

A build is unpacked with every library it needs from its own suite, its C library and dynamic loader
included (trixie's and sid's need a newer glibc than the machine's), and runs through that loader:
``<root>/.bin/<name> --library-path <root's libraries> <root>/usr/sbin/<name> ...``, where
``.bin/<name>`` is a link to the loader, so the process keeps its name.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .sandbox import SandboxError

MIRROR = "http://deb.debian.org/debian"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
LIBDIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")

# Of a package's dependencies, only the shared libraries are needed to run it from its folder: not
# the maintainer scripts' tools (perl, adduser, debconf, ...) nor the PAM modules and systemd's own.
LEFT_OUT = re.compile(r"perl|^libpam-modules|^libsemanage|^libsystemd-shared|^libc-bin$|^libc-gconv")

# Lists older than this are fetched again before a download; a download that fails refreshes lists
# older than REFRESH_AFTER (the suite may have moved on since), once.
LISTS_MAX_AGE = 7 * 24 * 3600
REFRESH_AFTER = 600
RETRIES = 3  # apt's own, each after a longer pause
STALE_SECONDS = 3600


class FetchError(SandboxError):
    pass


@dataclass(frozen=True)
class Wanted:
    """What to fetch: a package of a suite and the programs to run from it."""

    suite: str
    package: str
    programs: tuple[str, ...]  # paths in the package, e.g. "usr/sbin/pgbouncer"
    extra: tuple[str, ...] = ()  # more packages of the suite, outside the first one's dependencies


PGBOUNCER = {
    "1.15": Wanted("bullseye", "pgbouncer", ("usr/sbin/pgbouncer",)),
    "1.24": Wanted("trixie", "pgbouncer", ("usr/sbin/pgbouncer",)),
    "1.26": Wanted("sid", "pgbouncer", ("usr/sbin/pgbouncer",)),
}
MARIADB_PROGRAMS = ("usr/sbin/mariadbd", "usr/bin/resolveip", "usr/bin/my_print_defaults", "usr/bin/mariadb")
MYSQL = {
    # MariaDB's client tools come from the suite's client package: 11.8's server package has no my_print_defaults.
    "mariadb-10.5": Wanted("bullseye", "mariadb-server-core-10.5", MARIADB_PROGRAMS, ("mariadb-client-core-10.5",)),
    "mariadb-11.8": Wanted("trixie", "mariadb-server-core", MARIADB_PROGRAMS, ("mariadb-client-core",)),
    "mysql-9.7": Wanted("sid", "mysql-server-core", ("usr/sbin/mysqld",)),
}


@dataclass(frozen=True)
class Build:
    """An unpacked package and how to run its programs through its own loader."""

    root: Path

    @property
    def library_path(self) -> str:
        return os.pathsep.join(str(self.root / d) for d in LIBDIRS if (self.root / d).is_dir())

    def command(self, program: str) -> list[str]:
        """The argument list that runs ``program`` (a path in the package, or its file name)."""
        path = self._find(program)
        return [str(self.root / ".bin" / path.name), "--library-path", self.library_path, str(path)]

    def wrapper(self, program: str) -> Path:
        """A shell script that runs ``program`` this way, for scripts that run programs by path."""
        return self.root / ".wrapped" / self._find(program).relative_to(self.root / "usr")

    def _find(self, program: str) -> Path:
        if "/" in program:
            return self.root / program
        for folder in ("usr/sbin", "usr/bin"):
            if (self.root / folder / program).is_file():
                return self.root / folder / program
        raise FetchError(f"{program} not found in {self.root}")

    def version(self, program: str, flag: str = "--version") -> str:
        """What ``program flag`` prints, its first line (``pgbouncer -V``, ``mysqld --version``)."""
        result = subprocess.run([*self.command(program), flag], capture_output=True, text=True, timeout=30, check=False)
        out = (result.stdout or result.stderr).strip()
        if result.returncode != 0 or not out:
            raise FetchError(f"{program} does not run here: {(result.stdout + result.stderr).strip()[-1000:]}")
        return out.splitlines()[0]

    def reachable_from(self, folder: Path) -> Build:
        """A copy of this build in ``folder`` (hard links; copies across file systems), for a cache under
        a home only its owner enters."""

        def link(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        target = folder / "build"
        shutil.copytree(self.root, target, symlinks=True, copy_function=link)
        os.chmod(folder, 0o755)  # noqa: S103 - the servers may run as another user
        copy = Build(target)
        copy._link_programs()  # the wrappers name the root they were made in
        return copy

    def _link_programs(self) -> None:
        loader = next((self.root / d / "ld-linux-x86-64.so.2" for d in LIBDIRS
                       if (self.root / d / "ld-linux-x86-64.so.2").exists()), None)  # fmt: skip
        if loader is None:
            raise FetchError(f"no dynamic loader in {self.root}")
        bindir = self.root / ".bin"
        wrapped = self.root / ".wrapped"
        shutil.rmtree(bindir, ignore_errors=True)
        shutil.rmtree(wrapped, ignore_errors=True)
        bindir.mkdir()
        for folder in ("usr/sbin", "usr/bin"):
            for program in sorted((self.root / folder).glob("*")) if (self.root / folder).is_dir() else []:
                if not _is_elf(program) or (bindir / program.name).exists():
                    continue  # scripts run as they are
                os.symlink(os.path.relpath(loader, bindir), bindir / program.name)
                script = wrapped / program.relative_to(self.root / "usr")
                script.parent.mkdir(parents=True, exist_ok=True)
                args = " ".join(f"'{a}'" for a in self.command(str(program.relative_to(self.root))))
                script.write_text(f'#!/bin/sh\nexec {args} "$@"\n')
                script.chmod(0o755)
        if (self.root / "usr/share").is_dir() and not (wrapped / "share").exists():
            wrapped.mkdir(exist_ok=True)
            os.symlink("../usr/share", wrapped / "share")


def _is_elf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == b"\x7fELF"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "django-db" / "debian"


def fetch(wanted: Wanted, cache: Path | None = None) -> Build:
    """The unpacked package from the cache, downloaded and unpacked first if missing.

    One process at a time fetches into a suite's folder (a lock file there); a second one waits and
    then finds the build made.
    """
    folder = (cache or cache_root()) / wanted.suite
    target = folder / wanted.package
    build = Build(target)
    if _complete(build, wanted):
        return build
    try:
        _fetch(wanted, folder, target)
    except FetchError as e:
        raise FetchError(f"cannot fetch {wanted.package}/{wanted.suite} from Debian's archive: {e}") from e
    return build


def _fetch(wanted: Wanted, folder: Path, target: Path) -> None:
    build = Build(target)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        if _complete(build, wanted):
            return  # made by another process meanwhile
        _remove_stale(folder)
        work = Path(tempfile.mkdtemp(prefix=f".unpacking-{wanted.package}-", dir=folder))
        try:
            apt = Apt(folder / "apt", wanted.suite)
            packages = [wanted.package, *apt.libraries(wanted.package)]
            for extra in wanted.extra:
                packages += [extra, *apt.libraries(extra)]
            debs = apt.download(sorted(set(packages)), work / "debs")
            root = work / "root"
            for deb in debs:
                _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
            unpacked = Build(root)
            unpacked._link_programs()
            for program in wanted.programs:
                if not (root / program).is_file():
                    raise FetchError(f"{wanted.package}/{wanted.suite} has no {program}")
            (root / ".packages").write_text("".join(f"{deb.name}\n" for deb in debs))
            shutil.rmtree(target, ignore_errors=True)
            os.rename(root, target)
            Build(target)._link_programs()  # again: the links and wrappers name the folder they live in
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _complete(build: Build, wanted: Wanted) -> bool:
    return (build.root / ".packages").is_file() and all((build.root / p).is_file() for p in wanted.programs)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale(folder: Path) -> None:
    for stale in folder.glob(".unpacking-*"):
        try:
            if time.time() - stale.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _run(args: Sequence[str], what: str, timeout: float = 600) -> str:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"{what} did not finish in {e.timeout:g} s") from e
    except OSError as e:
        raise FetchError(f"{what}: {e}") from e
    if result.returncode != 0:
        raise FetchError(f"{what} failed ({result.returncode}): {(result.stderr or result.stdout).strip()[-2000:]}")
    return result.stdout


class Apt:
    """apt-get on one suite of Debian's archive with a configuration of its own, in ``folder``."""

    def __init__(self, folder: Path, suite: str):
        self.folder = folder
        self.suite = suite
        self.config = folder / "apt.conf"
        self.lists = folder / "lists"
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise FetchError(f"apt-get and dpkg-deb are needed to fetch packages of Debian {suite}")
        if not KEYRING.is_file():
            raise FetchError(f"{KEYRING} is missing: apt-get install -y debian-archive-keyring")
        self._write_config()

    def _write_config(self) -> None:
        for sub in ("lists/partial", "archives/partial", "cache"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        (self.folder / "sources.list").write_text(f"deb [signed-by={KEYRING}] {MIRROR} {self.suite} main\n")
        settings = {
            "Dir::Etc::SourceList": self.folder / "sources.list",
            "Dir::Etc::SourceParts": "/dev/null",
            "Dir::Etc::Preferences": "/dev/null",
            "Dir::Etc::PreferencesParts": "/dev/null",
            "Dir::State::Lists": self.lists,
            "Dir::State::status": "/dev/null",
            "Dir::Cache": self.folder / "cache",
            "Dir::Cache::archives": self.folder / "archives",
            "APT::Architecture": "amd64",
            "APT::Architectures": "amd64",
            "Acquire::Languages": "none",
            "APT::Install-Recommends": "false",
            "Acquire::Retries": RETRIES,
        }
        if os.geteuid() == 0:
            settings["APT::Sandbox::User"] = "root"  # downloads into a folder of root's
        lines = [f'{key} "{value}";' for key, value in settings.items()]
        # The machine's hooks (apt.conf.d) are not this configuration's business.
        lines += ["#clear APT::Update::Post-Invoke-Success;", "#clear APT::Update::Post-Invoke;",
                  "#clear DPkg::Post-Invoke;", "#clear DPkg::Pre-Invoke;"]  # fmt: skip
        self.config.write_text("\n".join(lines) + "\n")

    def _apt(self, *args: str, what: str, cwd: Path | None = None) -> str:
        try:
            result = subprocess.run(
                ["apt-get", "-c", str(self.config), "-q", *args],
                capture_output=True, text=True, timeout=600, check=False, cwd=cwd,
                env={**os.environ, "LC_ALL": "C"},
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise FetchError(f"{what} did not finish in {e.timeout:g} s") from e
        if result.returncode != 0:
            raise FetchError(f"{what} failed ({result.returncode}): {(result.stderr or result.stdout).strip()[-2000:]}")
        return result.stdout + result.stderr

    def update(self, force: bool = False) -> None:
        stamp = self.folder / "updated"  # apt gives the lists the archive's times, not the download's
        age = time.time() - stamp.stat().st_mtime if stamp.is_file() else None
        if age is not None and age < (REFRESH_AFTER if force else LISTS_MAX_AGE):
            return
        what = f"apt-get update of Debian {self.suite} ({MIRROR})"
        said = self._apt("update", what=what)
        if not list(self.lists.glob("*_Packages*")):  # apt-get update warns but succeeds when nothing came
            raise FetchError(f"{what} got no package list: {said.strip()[-2000:]}")
        stamp.touch()

    def libraries(self, package: str) -> list[str]:
        """The shared-library packages ``package`` needs in this suite, as a machine with nothing installed."""
        self.update()
        try:
            out = self._apt("-s", "install", package, what=f"resolving {package}/{self.suite}")
        except FetchError:
            self.update(force=True)
            out = self._apt("-s", "install", package, what=f"resolving {package}/{self.suite}")
        names = [line.split()[1] for line in out.splitlines() if line.startswith("Inst ")]
        return [n for n in names if (n.startswith("lib") or n == "zlib1g") and not LEFT_OUT.search(n)]

    def download(self, packages: Sequence[str], into: Path) -> list[Path]:
        into.mkdir(parents=True, exist_ok=True)
        specs = [f"{name}/{self.suite}" for name in packages]
        what = f"apt-get download {' '.join(specs)}"
        try:
            self._apt("download", *specs, what=what, cwd=into)
        except FetchError:
            self.update(force=True)  # the suite moved on since the lists were fetched
            self._apt("download", *specs, what=what, cwd=into)
        debs = sorted(into.glob("*.deb"))
        if len(debs) != len(packages):
            raise FetchError(f"{what} gave {len(debs)} files for {len(packages)} packages")
        return debs


@contextmanager
def runnable(build: Build) -> Iterator[Build]:
    """The build where the servers' user (``postgres``, ``mysql`` when run by root) can run it, while needed."""
    from .sandbox import reachable_by_others

    if os.geteuid() != 0 or reachable_by_others(build.root):
        yield build
        return
    folder = Path(tempfile.mkdtemp(prefix="django-db-build-"))
    try:
        yield build.reachable_from(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
