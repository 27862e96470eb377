"""One process at a time per run folder: ``<run dir>/run.lock``, created with ``O_EXCL`` by global rank 0.

The lock names its holder (pid, host, the process's start time, its command line). A second start of
the same run is refused at once, naming that process. A lock whose process is gone (its pid no longer
exists on this host, or now belongs to a process started later) is stale and taken over; the takeover
itself runs under a short-lived ``run.lock.takeover`` so two starts never both take it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .config_error import ConfigError

LOCK = "run.lock"
TAKEOVER = "run.lock.takeover"
# A takeover marker older than this was left by a process that died between the checks below.
TAKEOVER_STALE_S = 60.0


class RunLockedError(ConfigError):
    """Another live process runs in this run folder."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None where /proc does not say."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}


def _is_alive(holder: dict[str, Any]) -> bool | None:
    """Whether the lock's process still runs: None when it is on another host (unknowable from here)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    start = holder.get("process_start")
    return start is None or _process_start(pid) in (None, start)  # a reused pid is another process


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _create(path: Path, holder: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(holder, fh)
    return True


def _refuse(run_dir: Path, holder: dict[str, Any] | None, alive: bool | None) -> RunLockedError:
    who = "an unreadable lock" if holder is None else (
        f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}: {holder.get('command')})")
    hint = ("wait for it to end, or use name=NEW" if alive else
            f"if that process is gone, delete {run_dir / LOCK} and start again")
    return RunLockedError(f"run folder {run_dir} is in use by {who}: {hint}")


def acquire_run_lock(run_dir: str | Path) -> Path:
    """Lock ``run_dir`` for this process (released at exit, or by :func:`release_run_lock`)."""
    directory = Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path, mine = directory / LOCK, _holder()
    if not _create(path, mine):
        _take_over_stale(directory, path, mine)
    atexit.register(release_run_lock, path)
    return path


def _take_over_stale(directory: Path, path: Path, mine: dict[str, Any]) -> None:
    holder = _read(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        return  # this process holds it already (another run() of the same folder in this process)
    alive = _is_alive(holder) if holder is not None else None
    if alive is not False:
        raise _refuse(directory, holder, alive)
    marker = directory / TAKEOVER
    with contextlib.suppress(FileNotFoundError):
        if time.time() - marker.stat().st_mtime > TAKEOVER_STALE_S:
            marker.unlink()
    if not _create(marker, mine):
        raise _refuse(directory, _read(path), None)  # another start is taking it over right now
    try:
        if _read(path) != holder:  # it changed hands meanwhile: someone else started
            raise _refuse(directory, _read(path), True)
        path.unlink(missing_ok=True)
        if not _create(path, mine):
            raise _refuse(directory, _read(path), True)
        print(f"[ring-train] took over the lock of {directory} left by pid {holder.get('pid')} (no longer "
              "running)", flush=True)
    finally:
        marker.unlink(missing_ok=True)


def release_run_lock(path: str | Path) -> None:
    """Remove the lock if this process holds it."""
    lock = Path(path)
    holder = _read(lock)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)
