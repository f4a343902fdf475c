"""Following log files for error signatures, like ``tail -F``, a bounded number of bytes a run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

MAX_LINE = 64 * 1024  # a longer line is cut: its head is kept, the rest skipped


@dataclass
class _Position:
    handle: BinaryIO
    inode: tuple[int, int]
    pending: bytes = b""  # the start of a line not yet ended


class LogFollower:
    """Returns the lines added to each file since the previous run.

    The first run starts at the end of each file: what was written before the check
    started is history, not news. A file that appears later is read from its start.
    A rotated file (new inode at the path) is read to its end through the open handle,
    then the new file from its start; a file that shrank was truncated and is read
    again from its start.
    """

    def __init__(self, paths: tuple[str, ...], max_bytes: int):
        self.paths = paths
        self.max_bytes = max_bytes
        self.positions: dict[str, _Position] = {}
        self.problems: dict[str, str] = {}  # path: why it could not be read this run
        self.polled = False

    def close(self) -> None:
        for position in self.positions.values():
            position.handle.close()
        self.positions.clear()

    def poll(self) -> dict[str, list[str]]:
        """The new lines of every file that could be read, by path."""
        found: dict[str, list[str]] = {}
        self.problems = {}
        for path in self.paths:
            try:
                found[path] = [line.decode("utf-8", "replace") for line in self._new_lines(path)]
            except OSError as e:
                self.problems[path] = e.strerror or str(e)
        self.polled = True
        return found

    def _new_lines(self, path: str) -> list[bytes]:
        budget = self.max_bytes
        position = self.positions.get(path)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            if position is None:
                raise
            stat = None  # rotated away, not yet recreated: finish the old file
        inode = (stat.st_dev, stat.st_ino) if stat else None
        if position is None:
            assert stat is not None
            position = _Position(open(path, "rb"), (stat.st_dev, stat.st_ino))
            self.positions[path] = position
            if not self.polled:
                position.handle.seek(stat.st_size)
                return []
        lines: list[bytes] = []
        if inode is not None and inode != position.inode:
            # Rotated: the rest of the old file, then the new one from its start.
            data = position.handle.read(budget)
            budget -= len(data)
            lines += self._split(position, data, final=True)
            position.handle.close()
            assert stat is not None
            position = _Position(open(path, "rb"), inode)
            self.positions[path] = position
        elif stat is not None and stat.st_size < position.handle.tell():
            position.handle.seek(0)  # truncated
            position.pending = b""
        if budget > 0:
            lines += self._split(position, position.handle.read(budget), final=False)
        return lines

    @staticmethod
    def _split(position: _Position, data: bytes, final: bool) -> list[bytes]:
        data = position.pending + data
        lines = data.split(b"\n")
        position.pending = b"" if final else lines.pop()
        if len(position.pending) > MAX_LINE:
            lines.append(position.pending[:MAX_LINE])
            position.pending = b""
        return [line for line in lines if line]
