"""``resume=auto|never|PATH`` → the checkpoint to start from (or None)."""

from __future__ import annotations

from pathlib import Path

from ..callbacks.checkpointing import newest_complete_checkpoint


def resolve_resume(resume: str, checkpoint_dir: str | Path) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        found = newest_complete_checkpoint(checkpoint_dir)
        return str(found) if found is not None else None
    if not Path(resume).exists():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint (use 'auto', 'never' or an existing path)")
    return resume
