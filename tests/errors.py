"""Errors of a rank's shards against the oracle's full tensors, as the equivalence tests report them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def shard_errors(pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
                 shard: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """For each ``(name, mine, full_reference)``: the max absolute error of ``mine`` against this rank's
    ``shard`` of the reference (``name_abs``), and relative to the whole reference's largest entry
    (``name_rel``, as one process on the whole sequence would be judged)."""
    errs = {}
    for name, mine, theirs in pairs:
        theirs = theirs.detach()
        diff = (mine.detach().double() - shard(theirs).double()).abs().max().item()
        errs[name + "_abs"] = diff
        errs[name + "_rel"] = diff / max(theirs.abs().max().item(), 1e-12)
    return errs
