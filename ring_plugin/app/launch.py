"""Who started this process, and is it the run's global rank 0, before any process group exists.

``ring-train`` runs under three launchers, on one node or several:

* ``torchrun`` (one per node): sets ``TORCHELASTIC_RUN_ID``, ``RANK`` (global), ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``LOCAL_WORLD_SIZE``.
* SLURM ``srun`` (one task per GPU): sets ``SLURM_PROCID`` (global), ``SLURM_NTASKS``, ``SLURM_NNODES`` ...;
  Lightning's ``SLURMEnvironment`` reads them. torchrun wins when both are present (as in Lightning).
* Lightning's own launcher: the command starts on each node (``NODE_RANK`` = that node, 0 when unset)
  and re-runs itself for local ranks 1.. with ``LOCAL_RANK`` set.

The run's files (``run.yaml``, set-aside logs and checkpoints) are written by global rank 0 only; a
node's local rank 0 is not enough (on several nodes it would race rank 0 for the same files).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .config_error import ConfigError

# SLURM job names under which Lightning leaves the processes to another launcher (its interactive mode).
SLURM_INTERACTIVE = ("bash", "interactive")


def launcher(env: Mapping[str, str] | None = None) -> str:
    """``torchrun``, ``slurm`` or ``lightning``: the launcher Lightning will take the ranks from."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env:  # Lightning's test for torchrun (torch.distributed.is_torchelastic_launched)
        return "torchrun"
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in SLURM_INTERACTIVE:
        return "slurm"
    return "lightning"


def is_global_rank_zero(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is (or, under Lightning's launcher, will be) global rank 0."""
    env = os.environ if env is None else env
    kind = launcher(env)
    if kind == "torchrun":
        return env.get("RANK") == "0"  # not SLURM_PROCID: under `srun torchrun` that is the node's task id
    if kind == "slurm":
        return env.get("SLURM_PROCID", "0") == "0"
    node = env.get("NODE_RANK", env.get("GROUP_RANK", "0"))  # as Lightning's LightningEnvironment reads it
    return env.get("LOCAL_RANK", "0") == "0" and node == "0"


def check_launch(devices: int, num_nodes: int, env: Mapping[str, str] | None = None) -> None:
    """``devices`` x ``num_nodes`` must be what the external launcher started (else ranks hang or Lightning
    raises deep inside the Trainer): said once here, on every rank, naming the launcher's option."""
    env = os.environ if env is None else env
    kind = launcher(env)
    if kind == "torchrun":
        checks = [("devices", devices, "LOCAL_WORLD_SIZE", "--nproc-per-node"),
                  ("devices x num_nodes", devices * num_nodes, "WORLD_SIZE", "--nproc-per-node x --nnodes")]
    elif kind == "slurm":
        checks = [("devices", devices, "SLURM_NTASKS_PER_NODE", "--ntasks-per-node"),
                  ("num_nodes", num_nodes, "SLURM_NNODES", "--nodes"),
                  ("devices x num_nodes", devices * num_nodes, "SLURM_NTASKS", "--ntasks")]
    else:
        return
    for key, value, var, option in checks:
        given = env.get(var)
        # SLURM_NTASKS_PER_NODE may read "4(x2)" on heterogeneous allocations: only plain numbers are compared
        if given is not None and given.isdigit() and int(given) != value:
            raise ConfigError(f"{key}={value} but {kind} started {given} ({var}, {option}): set devices to the "
                              "processes per node and num_nodes to the nodes the launcher started")
