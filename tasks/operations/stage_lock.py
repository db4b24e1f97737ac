"""One run of a stage at a time per workspace.

`versvideo stage NAME` holds an exclusive lock on .versvideo/locks/NAME.lock while it runs. The
lock is the kernel's (flock), so it dies with its process: the lock of a killed run is free at
once, with no stale file to clean. The file records the holder's pid, host and start time, which
a second run names when it fails. flock works on local disks and on NFS v4 (Linux emulates it
with byte-range locks there); two machines sharing a workspace over another network filesystem
are not protected.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCKS = Path(".versvideo/locks")


class StageBusy(RuntimeError):
    """Another run of the same stage holds this workspace's lock."""


@contextlib.contextmanager
def stage_lock(stage: str, locks: Path = LOCKS) -> Iterator[None]:
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"{stage}.lock"
    handle = open(path, "a+")  # never truncates: a holder's record stays readable until we own the lock
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageBusy(f"stage {stage} is already running in this folder ({describe_holder(path)}); "
                            f"wait for it to finish, or stop it; its lock is {path}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock; the record stays as a note of the last holder


def describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError):
        return "its holder has not written its record yet"
