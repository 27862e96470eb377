"""The rendezvous store under ``torchrun`` restarts, fresh for every attempt.

torchrun's agent hosts the rendezvous store and (with ``TORCHELASTIC_USE_AGENT_STORE``) every worker
is its client. torch assumes that store is new on every restart, but it is not always: a restarted
rank can then read the previous attempt's gloo/NCCL addresses and fail with "connectFullMesh ...
Connection refused". Prefixing the keys with the restart count makes each attempt's rendezvous its own.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist


def elastic_attempt_store(timeout: timedelta) -> dist.Store | None:
    """A client of torchrun's agent store whose keys belong to this restart attempt, or None when
    not running under a torchrun agent that hosts the store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/ring_plugin/attempt_{attempt}", store)

