"""The exact reference: dense attention over the full sequence, in fp32 or fp64.

``reference_attention`` is what every variant is tested against (docs/design.md). It materialises the
full score matrix on purpose: it is simple, obviously right, and slow.
"""

from __future__ import annotations

import torch


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    allowed: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Attention on full ``(batch, n, heads, head_dim)`` tensors, returned in ``q``'s dtype.

    ``allowed``: optional bool mask ``(n_q, n_k)``, ``(heads, n_q, n_k)`` or ``(batch, 1, n_q, n_k)`` of permitted pairs
    (combined with causal), or an integer tensor of the same shapes saying how many times each key
    counts (0 = masked; dilated attention counts a key once per pair that selects it).
    ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention).
    Rows with no permitted key output 0.
    """
    groups = q.shape[2] // k.shape[2]
    qc, kc, vc = (t.to(compute_dtype).transpose(1, 2) for t in (q, k, v))
    if groups > 1:
        kc, vc = kc.repeat_interleave(groups, dim=1), vc.repeat_interleave(groups, dim=1)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    n_q, n_k = s.shape[-2:]
    keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep.tril()
    if allowed is not None:
        allowed = allowed.to(q.device)
        if allowed.dtype != torch.bool:
            # A key counted c times adds c * exp(score): the same as score + log(c).
            s = s + torch.log(allowed.clamp(min=1).to(compute_dtype))
        keep = keep & (allowed != 0)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no permitted key
    out = torch.matmul(p, vc)
    return out.transpose(1, 2).to(q.dtype)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """``(batch, 1, n, n)`` bool: query i may see key j iff both lie in the same document
    (``document_ids``: ``(batch, n)``), the oracle's mask for packed sequences."""
    return (document_ids[:, :, None] == document_ids[:, None, :]).unsqueeze(1)
