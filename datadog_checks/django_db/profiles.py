"""Per-application profiles (the ``apps`` option): the connection math of a runbook.

Each profile matches application names and may give the application's budget of connections,
its own CONN_MAX_AGE (so its leak threshold follows it) and whether a client-side pool keeps
idle connections on purpose. The options are checked in config_models/validators.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .config_models.validators import profile_label
from .patterns import compile_name_pattern
from .settings import AppProfile, profile_for

__all__ = ["AppProfile", "profile_for", "profiles_from"]


def profiles_from(
    apps: Iterable[Any] | None,
    conn_max_age: float | None,
    leak_idle_seconds: float,
    leak_for: Callable[[float | None], float],
) -> tuple[AppProfile, ...]:
    """The profiles of the validated ``apps`` models. A profile without ``conn_max_age`` keeps the instance's
    CONN_MAX_AGE and leak threshold; one with its own gets the leak threshold ``leak_for`` gives it."""
    profiles = []
    for app in apps or ():
        if "conn_max_age" in app.model_fields_set:
            own_age = None if app.conn_max_age is None else float(app.conn_max_age)
            leak = leak_for(own_age)
        else:
            own_age, leak = conn_max_age, leak_idle_seconds
        profiles.append(
            AppProfile(
                name=app.name or profile_label(app.match),
                match=compile_name_pattern(app.match),
                max_connections=app.max_connections,
                conn_max_age=own_age,
                leak_idle_seconds=leak,
                pooled=bool(app.pooled),
            )
        )
    return tuple(profiles)
