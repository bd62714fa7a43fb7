"""A training run's directory: checked before anything is created, held by one run at a time,
and its metrics kept to one record per step across restarts.

  check_writable(path)      refuse a file, a path under a file, or a directory we cannot write
  WorkdirLock(path)         an exclusive OS lock (flock) that dies with its process
  supersede_metrics(path, step)   move records past `step` out of metrics.jsonl
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time

LOCK_FILE = ".lock"
METRICS = "metrics.jsonl"
SUPERSEDED = "metrics.superseded.jsonl"


def check_writable(path: str) -> None:
    """Raise ValueError naming `path` unless a run can create and write it. Creates nothing
    that outlives the call."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--workdir {path!r} is a file, not a directory; give a directory "
                         f"(new or a run's workdir)")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--workdir {path!r} cannot be created: {existing!r} is a file")
    try:  # a real write, not os.access: ACLs, read-only mounts and quotas all show here
        fd, probe = tempfile.mkstemp(prefix=".dsv3-write-test-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--workdir {path!r} cannot be written: {existing!r} refused a file "
                         f"({e.strerror}); choose a writable directory") from e


class WorkdirLock:
    """An exclusive `flock` on WORKDIR/.lock, held for the run (process 0 of a job only: the
    other processes of a multi-host job share the workdir). The kernel drops it when the process
    dies, so a killed run never leaves a stale lock; the file records the holder for messages."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> WorkdirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(
                f"workdir {os.path.dirname(self.path)!r} is in use by another run ({holder}); "
                f"wait for it to finish, stop it, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def supersede_metrics(workdir: str, step: int) -> int:
    """Move the records of metrics.jsonl past `step` (logged after the checkpoint a run resumes
    from, and about to be logged again) to metrics.superseded.jsonl, tagged with when; returns
    how many moved. The rewrite is atomic: a crash leaves the old file or the new one."""
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return 0
    keep, moved = [], []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record_step = json.loads(line).get("step", 0)
            except json.JSONDecodeError:  # a torn last line of a killed run
                record_step = step + 1
            (moved if record_step > step else keep).append(line.rstrip("\n"))
    if not moved:
        return 0
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(os.path.join(workdir, SUPERSEDED), "a") as f:
        for line in moved:
            try:
                record = dict(json.loads(line), superseded_at=stamp, resumed_from=step)
                f.write(json.dumps(record) + "\n")
            except json.JSONDecodeError:
                f.write(line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return len(moved)
