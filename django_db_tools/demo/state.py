"""What the scenario and the shop's views share: the signals that end a stuck or leaking piece of work."""

from __future__ import annotations

import threading


class ShopState:
    def __init__(self) -> None:
        self.release_checkouts = threading.Event()  # the slow payment provider finally answers
        self.stop_reports = threading.Event()  # the report threads are told to finish
        self.report_threads: list[threading.Thread] = []
        self.lock = threading.Lock()


STATE = ShopState()
