"""The log follower on real files: start at the end, partial lines, bounded reads, late files."""

from __future__ import annotations

import os
from collections import Counter

from datadog_checks.django_db.evaluate.signatures import count_log_lines
from datadog_checks.django_db.sources.logs import LogFollower


def counted(follower: LogFollower) -> Counter[str]:
    """Signatures in the lines one poll returns, over every file."""
    return count_log_lines(line for lines in follower.poll().values() for line in lines)


REFUSED = b"2026-11-21 05:00:00 UTC [7] FATAL:  sorry, too many clients already\n"
NOISE = b"2026-11-21 05:00:00 UTC [7] LOG:  checkpoint complete\n"


def test_history_is_skipped_and_new_lines_counted(tmp_path):
    log = tmp_path / "postgres.log"
    log.write_bytes(REFUSED * 3)
    follower = LogFollower((str(log),), 1 << 20)
    assert counted(follower) == {}
    with open(log, "ab") as handle:
        handle.write(NOISE + REFUSED + REFUSED[:20])  # the last line is still being written
    assert counted(follower) == {"too_many_clients": 1}
    with open(log, "ab") as handle:
        handle.write(REFUSED[20:])
    assert counted(follower) == {"too_many_clients": 1}
    follower.close()


def test_reads_are_bounded_and_resume(tmp_path):
    log = tmp_path / "pgbouncer.log"
    log.write_bytes(b"")
    follower = LogFollower((str(log),), 1024)
    counted(follower)
    log.write_bytes(REFUSED * 100)  # about 6.8 KiB
    counts = [counted(follower).get("too_many_clients", 0) for _ in range(8)]
    assert all(count <= 1024 // len(REFUSED) + 1 for count in counts)
    assert sum(counts) == 100
    follower.close()


def test_a_file_that_appears_later_is_read_from_its_start(tmp_path):
    log = tmp_path / "late.log"
    follower = LogFollower((str(log),), 1 << 20)
    assert counted(follower) == {}
    assert "No such file" in follower.problems[str(log)]
    log.write_bytes(REFUSED * 2)
    assert counted(follower) == {"too_many_clients": 2}
    assert follower.problems == {}
    follower.close()


def test_rotation_without_a_new_file_yet(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    follower = LogFollower((str(log),), 1 << 20)
    counted(follower)
    with open(log, "ab") as handle:
        handle.write(REFUSED)
    os.rename(log, tmp_path / "app.log.1")
    assert counted(follower) == {"too_many_clients": 1}  # finished through the open handle
    log.write_bytes(REFUSED)
    assert counted(follower) == {"too_many_clients": 1}
    follower.close()
