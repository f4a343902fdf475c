"""The sandbox demo: ``python -m django_db_tools demo``.

Django is needed for the demo only (``pip install 'datadog-django-db[demo]'``); it is imported
when the demo starts, never by the check.
"""

from __future__ import annotations

import sys
from typing import TextIO

DJANGO_HINT = "the demo needs Django: pip install 'datadog-django-db[demo]'"
STARTUP_SECONDS = 10
PHASES = 4


def phase_plan(duration: float, phase_seconds: float | None, interval: float | None) -> tuple[float, float]:
    """Seconds per phase and between check runs, from the options given."""
    if phase_seconds is None:
        phase_seconds = max(4.0, (duration - STARTUP_SECONDS) / PHASES)
    if interval is None:
        interval = 3.0 if phase_seconds >= 12 else max(1.0, phase_seconds / 4)
    return phase_seconds, interval


def main(
    duration: float = 90,
    phase_seconds: float | None = None,
    interval: float | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        import django  # noqa: F401
    except ImportError:
        err.write(f"django_db demo: {DJANGO_HINT}\n")
        return 1
    from .scenario import run

    seconds, every = phase_plan(duration, phase_seconds, interval)
    return run(seconds, every, out, err)


def mysql_main(
    phase_seconds: float | None = None,
    interval: float | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The demo on a throwaway MariaDB: three phases of ``phase_seconds`` (default 20)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        import django  # noqa: F401
        import pymysql  # noqa: F401
    except ImportError:
        err.write("django_db demo: the MariaDB demo needs Django and PyMySQL: pip install 'datadog-django-db[demo]'\n")
        return 1
    from .mysql import run

    seconds = phase_seconds or 20.0
    return run(seconds, interval or max(1.0, min(4.0, seconds / 4)), out, err)
