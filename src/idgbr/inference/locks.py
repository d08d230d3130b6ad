"""Lock files for jobs that share a folder: who holds it (pid, host, process start time), is it stale, take it over.

    >>> lock = Lock("OUT/.idgbr-archive.lock")
    >>> holder = lock.try_acquire()            # None: ours; else the live holder's record
    >>> lock.touch()                           # heartbeat (mtime), for holders on other hosts
    >>> lock.release()                         # only removes the lock if it is still ours

The lock file is created complete (written to a temporary name, then ``os.link``-ed to the lock path, which fails
when it exists; this also works on NFS), so a reader never sees half a record. A holder on this host is stale when
its process is gone or its pid now names another process (start times differ); a holder on another host is stale
once its heartbeat is older than ``stale_after`` seconds (never, when that is None).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["Lock"]


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


class Lock:
    """A lock file created atomically (``os.link`` of a complete file: no reader sees it half written) holding the
    holder's pid, host and process start time; :meth:`touch` is the heartbeat."""

    def __init__(self, path: str | Path):
        self.path, self.token = Path(path), uuid.uuid4().hex

    def holder(self) -> dict[str, Any] | None:
        try:
            return {**json.loads(self.path.read_text()), "age": time.time() - self.path.stat().st_mtime}
        except FileNotFoundError:
            return None
        except ValueError:  # not ours to judge: treat as held by an unknown process
            return {"pid": None, "host": None, "age": 0.0}

    def is_stale(self, holder: dict[str, Any], stale_after: float | None) -> bool:
        if holder.get("host") == socket.gethostname() and holder.get("pid") is not None:
            started = _process_started(int(holder["pid"]))
            return started is None or abs(started - float(holder.get("started", started))) > 1.0
        return stale_after is not None and holder["age"] > stale_after

    def try_acquire(self, stale_after: float | None = None) -> dict[str, Any] | None:
        """Take the lock: ``None`` on success, else the live holder (a stale holder's lock is taken over)."""
        pid = os.getpid()
        record = {"pid": pid, "host": socket.gethostname(), "started": _process_started(pid), "token": self.token}
        tmp = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
        tmp.write_text(json.dumps(record))
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.path)
                    return None
                except FileExistsError:
                    holder = self.holder()
                    if holder is None:
                        continue
                    if not self.is_stale(holder, stale_after):
                        return holder
                    self._break(holder)
            return self.holder() or {"pid": None, "host": None, "age": 0.0}
        finally:
            tmp.unlink(missing_ok=True)

    def _break(self, holder: dict[str, Any]) -> None:
        """Move a stale lock aside; put it back if someone else's fresh lock was moved instead."""
        aside = self.path.with_name(f"{self.path.name}.{self.token}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if json.loads(aside.read_text()).get("token") != holder.get("token"):
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        except ValueError:
            pass
        aside.unlink(missing_ok=True)

    def acquire(self, stale_after: float | None = None, poll: float = 0.5) -> None:
        """Wait until the lock is ours."""
        while self.try_acquire(stale_after) is not None:
            time.sleep(poll)

    def touch(self, *_: Any) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def release(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
