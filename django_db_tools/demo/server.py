"""A WSGI server whose requests run on a pool of long-lived worker threads, like gunicorn's gthread workers.

Each worker thread keeps its own Django database connections between requests (Django's connections
are per thread), which is what makes CONN_MAX_AGE matter. Idle workers are reused last-in first-out,
so light traffic keeps using the same few threads and connections. Standard library only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

Job = Callable[[], None]


class WorkerPool:
    """Up to ``size`` threads, started on demand; ``on_exit`` runs in each thread as it ends."""

    def __init__(self, size: int, name: str = "worker", on_exit: Callable[[], None] | None = None):
        self.size = size
        self.name = name
        self.on_exit = on_exit
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[Job | None]] = []
        self._backlog: list[Job] = []
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            if self._idle:
                self._idle.pop().put(job)
            elif len(self._threads) < self.size:
                inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
                inbox.put(job)
                thread = threading.Thread(
                    target=self._work, args=(inbox,), name=f"{self.name}-{len(self._threads) + 1}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._backlog.append(job)

    def _work(self, inbox: queue.SimpleQueue[Job | None]) -> None:
        try:
            while True:
                job = inbox.get()
                while job is not None:
                    try:
                        job()
                    except Exception:  # noqa: S110 - the job reports its own errors
                        pass
                    with self._lock:
                        if self._backlog:
                            job = self._backlog.pop(0)
                        else:
                            job = None
                            if self._closed:
                                return
                            self._idle.append(inbox)
                if self._closed:
                    return
        finally:
            if self.on_exit is not None:
                self.on_exit()

    @property
    def threads(self) -> int:
        return len(self._threads)

    def shutdown(self, timeout: float = 10) -> list[str]:
        """Stop every worker once its current job ends; the names of those still running after ``timeout``."""
        with self._lock:
            self._closed = True
            self._backlog.clear()
            for inbox in self._idle:
                inbox.put(None)
            self._idle.clear()
        for thread in self._threads:
            thread.join(timeout)
        return [thread.name for thread in self._threads if thread.is_alive()]


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class PooledWSGIServer(WSGIServer):
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: Callable, pool: WorkerPool):
        self.pool = pool
        super().__init__(address, QuietHandler)
        self.set_app(app)

    def process_request(self, request, client_address):  # type: ignore[no-untyped-def]
        def handle() -> None:
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: S110 - a client that went away
                pass
            finally:
                self.shutdown_request(request)

        try:
            self.pool.submit(handle)
        except RuntimeError:
            self.shutdown_request(request)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="http-server")
        thread.start()
        return thread
