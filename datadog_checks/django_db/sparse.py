"""What is worth sending of a run's metrics: each series is billed, zeros included.

- A gauge that is zero on every healthy stack at its finest grain (a leak, a lock wait, a waiting client,
  the age of the oldest transaction left open) is sent while it is not zero, and once more as 0 on the
  first run it is back to zero or gone, so that a graph and a monitor see it end.
- A count of nothing is not sent: Datadog sums counts, and a missing one adds the same 0.
- A cumulative counter (``monotonic_count``) is sent the first time it is seen and then each time it has
  moved: the Agent counts the difference from the previous value sent, which an unchanged value would
  make 0.
Every other metric is sent every run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .evaluate.model import Metric

# Gauges sent while not zero (and once as 0 after).
WHILE_NOT_ZERO = frozenset(
    {
        "django_db.postgres.leaked_connections",
        "django_db.postgres.waiting_on_lock",
        "django_db.postgres.idle.max_age",
        "django_db.postgres.idle_in_transaction.max_age",
        "django_db.postgres.active.max_duration",
        "django_db.pgbouncer.leaked_clients",
        "django_db.pgbouncer.pools.cl_waiting",
        "django_db.pgbouncer.pools.maxwait",
        "django_db.pgbouncer.pools.server_utilization",
        "django_db.mysql.leaked_connections",
        "django_db.mysql.idle.max_age",
        "django_db.mysql.transaction.max_age",
    }
)
Context = tuple[str, tuple[str, ...]]


class Sparse:
    """Chooses a run's metrics to send; remembers, between runs, the gauges sent not zero and the last value
    of each cumulative counter sent."""

    def __init__(self) -> None:
        self.not_zero: set[Context] = set()  # sent not zero in the previous run
        self.now_not_zero: set[Context] = set()  # ... in this run
        self.ended: set[Context] = set()  # back to zero in this run: already sent as 0
        self.counters: dict[Context, float] = {}
        self.counted: dict[Context, float] = {}  # this run's

    def chosen(self, metrics: Iterable[Metric]) -> Iterator[Metric]:
        now_not_zero, not_zero, ended, counters, counted = (
            self.now_not_zero, self.not_zero, self.ended, self.counters, self.counted
        )  # fmt: skip
        for metric in metrics:
            kind, name, value, tags = metric
            if kind == "gauge":
                if name in WHILE_NOT_ZERO:
                    context = (name, tags)
                    if value:
                        now_not_zero.add(context)
                    elif context in not_zero and context not in ended:
                        ended.add(context)
                    else:
                        continue
            elif kind == "count":
                if not value:
                    continue
            elif kind == "monotonic_count":
                context = (name, tags)
                counted[context] = value
                if counters.get(context) == value:
                    continue
            yield metric

    def end_run(self) -> Iterator[Metric]:
        """The zeros of the gauges sent not zero in the previous run that this run did not send; then the run's
        state becomes the previous run's."""
        for name, tags in self.not_zero - self.now_not_zero - self.ended:
            yield Metric("gauge", name, 0.0, tags)
        self.not_zero, self.now_not_zero, self.ended = self.now_not_zero, set(), set()
        self.counters, self.counted = self.counted, {}
