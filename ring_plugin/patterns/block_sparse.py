"""Block-sparse attention as a pattern: a boolean mask over (query block, key block) pairs.

``sparsity_ratio`` is the fraction of block pairs skipped (0.9 = 90 % sparse), so each query block
keeps about ``(1 - sparsity) * n_blocks`` key blocks:

- ``local``: a window of that many blocks centred on the diagonal;
- ``dilated_sparse``: every ``stride``-th block counted from the diagonal, ``stride ~ 1/(1-sparsity)``;
- ``global_local``: the first blocks are global (they see and are seen by every block), the rest of
  the budget is a local window.

The mask is a pure function of ``(n_blocks, sparsity, pattern)``; ``block_mask`` is public so users
can look at (and plot) what is computed. Rows with no allowed key output 0.
"""

from __future__ import annotations

import torch

from .blocks import BlockBuilder, CachedPattern, IndexBlock, chunk_pairs


def block_mask(n_blocks: int, sparsity_ratio: float, pattern_type: str) -> torch.Tensor:
    """(n_blocks, n_blocks) bool mask of computed (query block, key block) pairs."""
    keep = max(1, round((1.0 - sparsity_ratio) * n_blocks))
    i = torch.arange(n_blocks)[:, None]
    j = torch.arange(n_blocks)[None, :]
    if pattern_type == "local":
        return (j - i >= -((keep - 1) // 2)) & (j - i <= keep // 2)
    if pattern_type == "dilated_sparse":
        stride = max(1, round(1.0 / (1.0 - sparsity_ratio)))
        return (j - i) % stride == 0
    if pattern_type == "global_local":
        n_global = max(1, keep // 4)
        window = max(1, keep - n_global)
        local = (j - i >= -((window - 1) // 2)) & (j - i <= window // 2)
        return local | (i < n_global) | (j < n_global)
    raise ValueError(f"pattern_type={pattern_type!r} is not known; valid: local, dilated_sparse, global_local")


class BlockSparsePattern(CachedPattern):
    def __init__(self, block_size: int, sparsity_ratio: float, pattern_type: str):
        self.block_size = block_size
        self.sparsity_ratio = sparsity_ratio
        self.pattern_type = pattern_type
        super().__init__()

    def mask(self, n: int) -> torch.Tensor:
        return block_mask(n // self.block_size, self.sparsity_ratio, self.pattern_type)

    def keys_per_query(self, n: int) -> float:
        """Average keys one query attends to before causal masking (the mask's kept share of ``n``)."""
        return float(self.mask(n).float().mean()) * n

    def error(self, n_global: int, chunk_len: int, heads: int) -> str | None:
        if chunk_len % self.block_size:
            return (
                f"block_size={self.block_size} must divide the length of each shard chunk ({chunk_len}; "
                f"global length {n_global}): blocks may not straddle ranks"
            )
        return None

    def _plan(self, q_chunks, kv_chunks, chunk_len, n, causal, heads, kv_heads) -> list[IndexBlock]:
        bs = self.block_size
        per = chunk_len // bs
        mask = self.mask(n)
        all_heads = tuple(range(heads))
        tok = torch.arange(bs)
        builder = BlockBuilder(heads, kv_heads, len(q_chunks) * chunk_len, len(kv_chunks) * chunk_len)
        for lq, qs, lk, ks, same in chunk_pairs(q_chunks, kv_chunks, chunk_len, causal):
            sub = mask[qs // bs : qs // bs + per, ks // bs : ks // bs + per].clone()
            if causal and same:
                # Diagonal blocks are causal squares; strictly lower blocks are full.
                for qb in torch.nonzero(sub.diagonal()).flatten().tolist():
                    rows = lq + qb * bs + tok
                    builder.add(("diag", lk), all_heads, rows, rows - lq + lk, True)
                sub = sub.tril(-1)
            # Query blocks with the same number of key blocks fold into one kernel call.
            n_keys = sub.sum(1)
            for qb in torch.nonzero(n_keys).flatten().tolist():
                kbs = torch.nonzero(sub[qb]).flatten()
                kv_rows = (lk + kbs[:, None] * bs + tok[None, :]).flatten()
                builder.add(("full", lk), all_heads, lq + qb * bs + tok, kv_rows, False)
        return builder.blocks()

    def counts(self, n: int, heads: int, device: torch.device | None = None) -> torch.Tensor:
        """(n, n) int 0/1: the block mask expanded to tokens (the oracle's mask)."""
        bs = self.block_size
        m = self.mask(n).to(device)
        return m.repeat_interleave(bs, 0).repeat_interleave(bs, 1).int()
