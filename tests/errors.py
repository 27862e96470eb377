"""Errors of a rank's shards against the oracle's full tensors, as the equivalence tests report them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from ring_plugin import reference_attention


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


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, causal: bool,
           allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The fp64 oracle on the full sequences: its output and its q, k, v leaves (holding dq, dk, dv for
    the output gradient ``g``)."""
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*ref, causal=causal, allowed=allowed)
    (out * g.double()).sum().backward()
    return out.detach(), ref


def ring_errors(attend: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], ref_out: torch.Tensor,
                ref: Sequence[torch.Tensor], dtype: torch.dtype,
                shard: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """``attend`` on this rank's ``shard`` of the full q, k, v (in ``dtype``), backward with the shard of
    ``g`` (``inputs`` = q, k, v, g): its output and dq, dk, dv against the oracle's (:func:`shard_errors`)."""
    q, k, v, g = inputs
    local = [shard(t.to(dtype)).requires_grad_() for t in (q, k, v)]
    out = attend(*local)
    (out * shard(g.to(dtype))).sum().backward()
    pairs = [("out", out, ref_out)] + list(zip(("dq", "dk", "dv"), (t.grad for t in local), (t.grad for t in ref)))
    return shard_errors(pairs, shard)


# fp32: absolute error against the fp64 oracle; bf16: error relative to the tensor's magnitude
TOLERANCES = {
    torch.float32: (("out_abs", "dq_abs", "dk_abs", "dv_abs"), 1e-5),
    torch.bfloat16: (("out_rel", "dq_rel", "dk_rel", "dv_rel"), 2e-2),
}


def worst_over_ranks(worker: Callable, cases: list, worlds: Iterable[int] = (1, 2, 4),
                     timeout: float = 300) -> dict[int, list[dict[str, float]]]:
    """For each world size: one spawned world runs ``worker(rank, world, cases)`` (a list of error dicts,
    one per case); the result is, per case, the worst error over the ranks."""
    from ring_plugin.testing import run_in_process_group

    out = {}
    for world in worlds:
        per_rank = run_in_process_group(worker, world, cases, timeout=timeout, reuse=True)
        out[world] = [{key: max(r[i][key] for r in per_rank) for key in per_rank[0][i]} for i in range(len(cases))]
    return out
