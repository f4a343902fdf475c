"""gunicorn settings from the environment: ``WEBAPP_BIND``, ``WEBAPP_WORKERS``, ``WEBAPP_THREADS``,
``WEBAPP_MAX_REQUESTS`` (a worker exits after that many requests and the master starts another; 0: never).

gthread workers, as most Django deployments run them: each thread keeps its own Django connection.
"""

import os

bind = os.environ.get("WEBAPP_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEBAPP_WORKERS", "1"))
threads = int(os.environ.get("WEBAPP_THREADS", "2"))
max_requests = int(os.environ.get("WEBAPP_MAX_REQUESTS", "0"))
worker_class = "gthread"
wsgi_app = "django_db_tools.webapp.wsgi:application"
timeout = 60
graceful_timeout = 5
accesslog = None
errorlog = "-"
loglevel = "warning"


def child_exit(server, worker):
    """In prometheus_client's multiprocess mode, a dead worker's live gauges must go."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
