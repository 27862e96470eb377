"""Which run a checkpoints folder belongs to: ``<folder>/owner.json`` names the run's id, name and folder.

Every checkpoint's manifest carries the id of the run that wrote it; a checkpoint counts as this run's
only when that id is the folder's owner's. Everything else in the folder (another run's checkpoints,
junk named ``stepN.ckpt``) is reported, never loaded, never deleted.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

OWNER = "owner.json"


def read_owner(directory: str | Path) -> dict[str, Any] | None:
    """The folder's owner record (``run_id``, ``name``, ``run_dir``), or None when it has none or it is unreadable."""
    try:
        owner = json.loads((Path(directory) / OWNER).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("run_id"), str) else None


def owner_id(directory: str | Path) -> str | None:
    owner = read_owner(directory)
    return owner["run_id"] if owner is not None else None


def write_owner(directory: str | Path, run_id: str, name: str | None = None, run_dir: str | None = None) -> None:
    """Record (atomically) that ``directory`` holds the checkpoints of run ``run_id``."""
    path = Path(directory) / OWNER
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{OWNER}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"run_id": run_id, "name": name, "run_dir": run_dir}, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def claim_if_unowned(directory: str | Path) -> str:
    """The folder's run id, claiming it for a new run when it has no owner yet (the callback used on its own)."""
    found = owner_id(directory)
    if found is None:
        found = uuid.uuid4().hex
        write_owner(directory, found)
    return found


def describe_owner(owner: dict[str, Any]) -> str:
    return f"run {owner.get('name')!r} ({owner.get('run_dir')}, run id {owner['run_id']})"
