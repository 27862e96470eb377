"""Checkpoint files on disk: their manifests (SHA-256 of every byte), verification and listing.

Each checkpoint ``stepNNNNNN.ckpt`` (a file, or a directory with DeepSpeed) has a manifest
``stepNNNNNN.ckpt.manifest.json`` beside it, written before the checkpoint is renamed into place. It
holds the id of the run that wrote it, the SHA-256 of every file and whether the model was healthy (no
non-finite steps being skipped) when it was written. A checkpoint is usable only if its manifest names
the folder's owner (``checkpoint_owner``) and every byte still matches: a damaged tensor inside an intact
zip loads without complaint, so opening the file proves nothing, and a file without such a manifest is
never opened at all (unpickling it could run code).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint_owner import OWNER, owner_id
from .disk_full import cleaned_up_on_disk_full, remove_path

CHECKPOINT_NAME = re.compile(r"^step(\d+)\.ckpt$")
MANIFEST_SUFFIX = ".manifest.json"
PARTIAL_SUFFIX = ".partial"
_CHUNK = 16 << 20


def manifest_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + MANIFEST_SUFFIX)


def checkpoint_step(path: Path) -> int | None:
    m = CHECKPOINT_NAME.match(path.name)
    return int(m.group(1)) if m else None


def _files(root: Path) -> list[Path]:
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())


def digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file of a checkpoint, keyed by the path relative to it ("" for a single file)."""
    out = {}
    for f in _files(root):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        out["" if f == root else f.relative_to(root).as_posix()] = h.hexdigest()
    return out


def fsync_tree(path: Path) -> None:
    for f in _files(path):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def write_manifest(checkpoint: Path, written: Path, step: int, healthy: bool, run_id: str) -> None:
    """Write (atomically) the manifest of ``checkpoint`` from the bytes of ``written``, its not yet renamed copy."""
    target = manifest_path(checkpoint)
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    manifest = {"run_id": run_id, "step": step, "healthy": healthy, "sha256": digests(written)}
    with cleaned_up_on_disk_full(target, partial, written):
        with open(partial, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, target)


def read_manifest(checkpoint: Path) -> dict | None:
    try:
        return json.loads(manifest_path(checkpoint).read_text())
    except (OSError, ValueError):
        return None


def foreign_reason(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` is not one of its folder's owner's checkpoints (None when it is). Reads only JSON."""
    manifest = read_manifest(checkpoint)
    if manifest is None:
        what = "an unreadable manifest" if manifest_path(checkpoint).exists() else "no manifest"
        return f"{what}: not written by this run, left alone"
    owner = owner_id(checkpoint.parent)
    if owner is None:
        return f"its folder has no {OWNER} naming the run that owns it, left alone"
    if manifest.get("run_id") != owner:
        return f"written by another run (run id {manifest.get('run_id')}, this folder's is {owner}), left alone"
    return None


def is_own(checkpoint: Path) -> bool:
    return foreign_reason(checkpoint) is None


def verify(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be used, or None when its manifest names the folder's owner and every byte
    matches it. Nothing is unpickled: a checkpoint is trusted only through its manifest."""
    if not checkpoint.exists():
        return "missing"
    reason = foreign_reason(checkpoint)
    if reason is not None:
        return reason
    manifest = read_manifest(checkpoint) or {}
    want: dict[str, str] = manifest.get("sha256", {})
    got = digests(checkpoint)
    for name in sorted(want.keys() | got.keys()):
        shown = checkpoint / name if name else checkpoint
        if name not in got:
            return f"{shown} is missing"
        if name not in want:
            return f"{shown} is not in the manifest"
        if got[name] != want[name]:
            return f"checksum mismatch in {shown} (damaged since it was written)"
    return None


def is_healthy(checkpoint: Path) -> bool:
    """Whether the model was healthy when ``checkpoint`` was written, by its manifest."""
    manifest = read_manifest(checkpoint)
    return manifest is not None and bool(manifest.get("healthy", True))


def checkpoints_newest_first(dirpath: str | Path) -> list[Path]:
    d = Path(dirpath)
    if not d.is_dir():
        return []
    found = [(step, p) for p in d.iterdir() if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found, key=lambda sp: (sp[0], sp[1].stat().st_mtime), reverse=True)]


@dataclass
class Scan:
    """The newest checkpoint of a directory that can be used (or None), the run's newer ones rejected, with why,
    and the files named like checkpoints that are not the run's (``foreign``: never loaded, never deleted)."""

    found: Path | None = None
    rejected: list[tuple[Path, str]] = field(default_factory=list)
    foreign: list[tuple[Path, str]] = field(default_factory=list)

    def report(self) -> str:
        return "\n".join(f"  {path}: {reason}" for path, reason in self.rejected)


def scan(dirpath: str | Path, healthy_only: bool = False) -> Scan:
    """Verify checkpoints newest first until one can be used, printing each rejection. ``healthy_only``
    also rejects those written while non-finite steps were being skipped (no rollback target)."""
    result = Scan()
    for path in checkpoints_newest_first(dirpath):
        not_own = foreign_reason(path)
        if not_own is not None:
            result.foreign.append((path, not_own))
            print(f"[ring-train] ignoring {path}: {not_own}", flush=True)
            continue
        reason = verify(path)
        if reason is None and healthy_only and not is_healthy(path):
            reason = "written while non-finite steps were being skipped"
        if reason is None:
            result.found = path
            break
        result.rejected.append((path, reason))
        print(f"[ring-train] skipping checkpoint {path}: {reason}", flush=True)
    return result


def newest_complete_checkpoint(dirpath: str | Path) -> Path | None:
    """The newest checkpoint under ``dirpath`` that verifies; damaged ones are skipped with their reason."""
    return scan(dirpath).found


def rotate(directory: Path, keep_last: int, protect: set[Path]) -> list[Path]:
    """Delete all but the ``keep_last`` newest of this run's checkpoints in ``directory`` (its manifest names
    the folder's owner; another run's files and junk neither count nor are deleted), except those in
    ``protect``, and this run's manifests left without a checkpoint; returns what was deleted."""
    own = [p for p in checkpoints_newest_first(directory) if is_own(p)]
    deleted = [p for p in own[keep_last:] if p not in protect]
    for path in deleted:
        remove_checkpoint(path)
    owner = owner_id(directory)
    for manifest in directory.glob("*" + MANIFEST_SUFFIX):  # left by a write interrupted before its rename
        checkpoint = manifest.with_name(manifest.name.removesuffix(MANIFEST_SUFFIX))
        if not checkpoint.exists() and (read_manifest(checkpoint) or {}).get("run_id") == owner:
            manifest.unlink(missing_ok=True)
    return deleted


def remove_checkpoint(checkpoint: Path) -> None:
    """Delete a checkpoint and its manifest."""
    remove_path(checkpoint)
    manifest_path(checkpoint).unlink(missing_ok=True)
