"""A Django 5.1 pool's get_stats() as Prometheus metrics, per alias: docs/django-metrics.md shows these lines as
they are.

Imported once per process (wsgi.py does it when the app runs with django-prometheus and Django's pool).
"""

from django.db import connections
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily

GAUGES = {"size": "pool_size", "available": "pool_available", "max_size": "pool_max", "min_size": "pool_min"}
GAUGES["requests_waiting"] = "requests_waiting"
COUNTERS = {"timeouts": "requests_errors", "connections": "connections_num"}


class DjangoPoolCollector:
    def families(self):
        gauges = {n: GaugeMetricFamily(f"django_db_pool_{n}", k, labels=["alias"]) for n, k in GAUGES.items()}
        counters = {n: CounterMetricFamily(f"django_db_pool_{n}", k, labels=["alias"]) for n, k in COUNTERS.items()}
        return gauges, counters

    def describe(self):  # registering must not call collect(): that would load the database backend
        gauges, counters = self.families()
        return [*gauges.values(), *counters.values()]

    def collect(self):
        gauges, counters = self.families()
        for alias in connections:
            if connections.settings[alias].get("OPTIONS", {}).get("pool"):
                stats = connections[alias].pool.get_stats()  # keys whose value is 0 may be missing
                for families, keys in ((gauges, GAUGES), (counters, COUNTERS)):
                    for name, key in keys.items():
                        families[name].add_metric([alias], stats.get(key, 0))
        return [*gauges.values(), *counters.values()]


REGISTRY.register(DjangoPoolCollector())
