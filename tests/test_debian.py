"""Fetching builds of other Debian suites: a private apt configuration, a cache, each build's own loader."""

from __future__ import annotations

import os
import subprocess

import pytest

from django_db_tools import debian


def test_the_private_configuration_keeps_apt_to_its_folder(tmp_path):
    apt = debian.Apt(tmp_path / "apt", "bullseye")
    dumped = subprocess.run(
        ["apt-config", "-c", str(apt.config), "dump"], capture_output=True, text=True, check=True
    ).stdout
    settings = {
        key.lower(): value.strip('"') for key, value in (line.rstrip(";").split(" ", 1) for line in dumped.splitlines())
    }
    assert settings["dir::state::status"] == "/dev/null"  # nothing installed is taken into account
    assert settings["dir::etc::sourceparts"] == "/dev/null"  # nor the machine's sources
    for key in ("dir::etc::sourcelist", "dir::state::lists", "dir::cache", "dir::cache::archives"):
        assert settings[key].startswith(str(tmp_path / "apt")), key
    for hook in ("apt::update::post-invoke-success", "apt::update::post-invoke", "dpkg::post-invoke"):
        assert settings.get(hook, "") == "", hook  # the machine's hooks never fire
    assert (tmp_path / "apt" / "sources.list").read_text() == (
        f"deb [signed-by={debian.KEYRING}] {debian.MIRROR} bullseye main\n"
    )


def test_an_unreachable_archive_fails_naming_suite_and_package(tmp_path, monkeypatch):
    monkeypatch.setattr(debian, "MIRROR", "http://127.0.0.1:9/debian")  # nothing listens there
    monkeypatch.setattr(debian, "RETRIES", 0)
    fails = r"(?s)cannot fetch pgbouncer/bullseye from Debian's archive: .* got no package list: .*Connection refused"
    with pytest.raises(debian.FetchError, match=fails):
        debian.fetch(debian.PGBOUNCER["1.15"], cache=tmp_path)
    assert not (tmp_path / "bullseye" / "pgbouncer").exists()


def test_a_package_the_suite_lacks_fails_naming_suite_and_package():
    missing = debian.Wanted("bullseye", "django-db-no-such-package", ("usr/sbin/nothing",))
    with pytest.raises(debian.FetchError, match=r"django-db-no-such-package/bullseye"):
        debian.fetch(missing)
    folder = debian.cache_root() / "bullseye"
    assert not (folder / missing.package).exists()
    assert not [p for p in folder.glob(".unpacking-*") if "no-such-package" in p.name]


def test_a_cached_build_is_used_without_apt_and_runs_through_its_own_loader(monkeypatch):
    wanted = debian.PGBOUNCER["1.24"]
    first = debian.fetch(wanted)  # fetched by now, or fetched here
    assert first.root == debian.cache_root() / "trixie" / "pgbouncer"
    monkeypatch.setenv("PATH", "/nonexistent")
    assert debian.fetch(wanted) == first
    monkeypatch.undo()
    assert first.version("pgbouncer", "-V").startswith("PgBouncer 1.24.")
    # Trixie's build needs a newer C library than the machine's: through the machine's loader it does not start.
    direct = subprocess.run([str(first.root / "usr/sbin/pgbouncer"), "-V"], capture_output=True, text=True)
    assert direct.returncode != 0 and "GLIBC_" in direct.stderr, direct
    link = first.root / ".bin" / "pgbouncer"  # the process keeps its name
    assert os.path.realpath(link).startswith(str(first.root)) and "ld-linux" in os.readlink(link)


def test_a_copy_for_another_user_runs_from_its_own_folder(tmp_path):
    build = debian.fetch(debian.PGBOUNCER["1.15"])
    copy = build.reachable_from(tmp_path)
    assert copy.root == tmp_path / "build"
    assert copy.command("pgbouncer")[0].startswith(str(tmp_path))
    assert str(build.root) not in " ".join(copy.command("pgbouncer"))
    assert copy.version("pgbouncer", "-V") == "PgBouncer 1.15.0"
