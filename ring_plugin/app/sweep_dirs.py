"""Sweep job folders named by their overrides: the same setting maps to the same folder, a new one to a new folder.

Hydra numbers a sweep's jobs (``multirun/<name>/0``, ``1``, ...): a second sweep with one value changed would
land in an earlier job's folder, and be refused as a changed run. ``hydra.sweep.subdir`` is instead the job's
overrides (``attention=sdpa,max_steps=100``, the run name left out: it names the sweep folder), made a safe
folder name: overrides too long for one, or holding a ``/``, are shortened and end in a hash of the whole.
"""

from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

RESOLVER = "ring_sweep_job"
# Folder names stay well under the 255 bytes file systems allow.
MAX_NAME = 80
SHOWN = 60


def job_folder(overrides: str) -> str:
    """The folder of a sweep job from Hydra's ``override_dirname`` (``key=value,...``, sorted by key)."""
    if not overrides:
        return "defaults"
    if len(overrides) <= MAX_NAME and "/" not in overrides:
        return overrides
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:10]
    return f"{overrides[:SHOWN].replace('/', '_')}-{digest}"


def register() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, job_folder)
