"""Checkpoint files on disk: their manifests (SHA-256 of every byte), verification and listing.

Each checkpoint ``stepNNNNNN.ckpt`` (a file, or a directory with DeepSpeed) has a manifest
``stepNNNNNN.ckpt.manifest.json`` beside it, written before the checkpoint is renamed into place. It
holds the SHA-256 of every file and whether the model was healthy (no non-finite steps being skipped)
when it was written. A checkpoint is usable only if every byte still matches: a damaged tensor inside
an intact zip loads without complaint, so opening the file proves nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

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


def write_manifest(checkpoint: Path, written: Path, step: int, healthy: bool) -> None:
    """Write (atomically) the manifest of ``checkpoint`` from the bytes of ``written``, its not yet renamed copy."""
    target = manifest_path(checkpoint)
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    manifest = {"step": step, "healthy": healthy, "sha256": digests(written)}
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


def verify(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be used, or None when every byte matches its manifest.

    A checkpoint without a manifest (written before manifests existed) must load completely, every
    tensor read; truncation is caught that way, damaged bytes inside a tensor are not.
    """
    if not checkpoint.exists():
        return "missing"
    manifest = read_manifest(checkpoint)
    if manifest is None:
        if manifest_path(checkpoint).exists():
            return f"its manifest {manifest_path(checkpoint).name} is unreadable"
        return _full_load_error(checkpoint)
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


def _full_load_error(checkpoint: Path) -> str | None:
    if checkpoint.is_dir():
        return None if any(checkpoint.iterdir()) else "empty directory and no manifest"
    try:
        torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to read means "not usable"
        return f"no manifest and it does not load: {type(err).__name__}: {err}"[:300]
    return None


def is_healthy(checkpoint: Path) -> bool:
    """Whether the model was healthy when ``checkpoint`` was written (true for one without a manifest)."""
    manifest = read_manifest(checkpoint)
    return bool(manifest.get("healthy", True)) if manifest is not None else True


def checkpoints_newest_first(dirpath: str | Path) -> list[Path]:
    d = Path(dirpath)
    if not d.is_dir():
        return []
    found = [(step, p) for p in d.iterdir() if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found, key=lambda sp: (sp[0], sp[1].stat().st_mtime), reverse=True)]


@dataclass
class Scan:
    """The newest checkpoint of a directory that can be used (or None), and the newer ones rejected, with why."""

    found: Path | None = None
    rejected: list[tuple[Path, str]] = field(default_factory=list)

    def report(self) -> str:
        return "\n".join(f"  {path}: {reason}" for path, reason in self.rejected)


def scan(dirpath: str | Path, healthy_only: bool = False) -> Scan:
    """Verify checkpoints newest first until one can be used, printing each rejection. ``healthy_only``
    also rejects those written while non-finite steps were being skipped (no rollback target)."""
    result = Scan()
    for path in checkpoints_newest_first(dirpath):
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
    """Delete all but the ``keep_last`` newest checkpoints of ``directory`` (whichever run wrote them),
    except those in ``protect``, and manifests left without a checkpoint; returns what was deleted."""
    deleted = [p for p in checkpoints_newest_first(directory)[keep_last:] if p not in protect]
    for path in deleted:
        remove_checkpoint(path)
    for manifest in directory.glob("*" + MANIFEST_SUFFIX):  # left by a write interrupted before its rename
        if not manifest.with_name(manifest.name.removesuffix(MANIFEST_SUFFIX)).exists():
            manifest.unlink(missing_ok=True)
    return deleted


def remove_checkpoint(checkpoint: Path) -> None:
    """Delete a checkpoint and its manifest."""
    if checkpoint.is_dir():
        shutil.rmtree(checkpoint)
    elif checkpoint.exists():
        checkpoint.unlink()
    manifest_path(checkpoint).unlink(missing_ok=True)
