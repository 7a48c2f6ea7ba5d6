"""The local settlement journal: where a usage record goes when Redis can't take it, so none is ever lost.

* ``append`` writes one JSON line to ``journal.jsonl`` with ``O_APPEND`` and ``fsync`` (and fsyncs the folder when
  the file is new), in a worker thread so the event loop never blocks on the disk.
* ``take`` starts a replay safely: under the lock it renames ``journal.jsonl`` to ``replay-<ns>.jsonl`` (an atomic
  rename, so new appends go to a fresh file) and returns every ``replay-*`` file, including ones left by a crash.
* The caller applies each entry with the idempotent settle script, then ``done`` deletes the file. Nothing is
  deleted before every entry of the file was acknowledged by Redis (no destructive drain); a replay that stops
  half way leaves the file, and the next replay applies it again -- harmless, settle counts a generation once.
* A line that is not valid JSON (a write torn by a crash) is copied to ``rejected.jsonl`` for an operator, never
  silently dropped. A torn last line has no trailing newline: the next append then starts with one, so the torn
  bytes stay a line of their own and never swallow the good entry written after them.

Several worker processes may share one folder: an append takes an exclusive ``flock`` on the file and re-opens it if
a replay renamed it meanwhile, and a replay takes the same lock before renaming, so no line can land in a file that a
replay has already read.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path
from typing import Any

import orjson


class Journal:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.path = self.dir / "journal.jsonl"
        self.rejected = self.dir / "rejected.jsonl"
        self._lock = asyncio.Lock()

    async def append(self, entry: dict[str, Any]) -> None:
        line = orjson.dumps(entry, default=str) + b"\n"
        async with self._lock:
            await asyncio.to_thread(self._append_sync, self.path, line)

    def pending(self) -> bool:
        return (self.path.exists() and self.path.stat().st_size > 0) or any(self.dir.glob("replay-*.jsonl"))

    def backlog(self) -> int:
        """Entries waiting to be replayed (lines of the journal and of replays not finished), for the metric."""
        n = 0
        for path in (self.path, *self.dir.glob("replay-*.jsonl")):
            try:
                with open(path, "rb") as f:
                    n += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
            except FileNotFoundError:
                continue
        return n

    async def take(self) -> list[Path]:
        async with self._lock:
            return await asyncio.to_thread(self._take_sync)

    def read(self, path: Path) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        bad: list[bytes] = []
        for raw in path.read_bytes().splitlines():
            if not raw.strip():
                continue
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError:
                item = None
            if isinstance(item, dict):
                entries.append(item)
            else:
                bad.append(raw)
        if bad:
            self._append_sync(self.rejected, b"".join(b + b"\n" for b in bad))
        return entries

    def reject(self, entry: dict[str, Any]) -> None:
        """Keep an entry that can't be applied (malformed) for an operator."""
        self._append_sync(self.rejected, orjson.dumps(entry, default=str) + b"\n")

    def done(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._sync_dir()

    # ---- blocking helpers (run in a worker thread) ----------------------------------------------------------------

    def _append_sync(self, path: Path, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        is_new = not path.exists()
        while True:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # a replay renamed the file between our open and our lock: append to the new one
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # the last line was torn (a crash mid-append): end it first
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if is_new:
            self._sync_dir()

    def _take_sync(self) -> list[Path]:
        if self.path.exists() and self.path.stat().st_size > 0:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # waits for an append in progress in another process
                self.path.rename(self.dir / f"replay-{time.time_ns()}-{os.getpid()}.jsonl")
            finally:
                os.close(fd)
            self._sync_dir()
        return sorted(self.dir.glob("replay-*.jsonl"))

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
