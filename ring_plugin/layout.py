"""Sequence shard layouts: which global positions each rank of a ring holds.

``contiguous``: rank r holds chunk r of k equal chunks.
``zigzag``: the sequence is cut into 2k chunks; rank r holds chunks r and 2k-1-r, which balances the
work of causal attention across ranks.
``balanced`` (packed documents): ``k * c`` equal chunks, c per rank, assigned so that every rank gets
the same work under the document mask (:func:`ring_plugin.documents.balance.balanced_chunks`): a pure function of
the global ``document_ids`` and the ring size, so every rank computes it from the batch it cuts.

Every layout is a :class:`ShardLayout`: the list of global chunk indices each rank holds (ascending,
so local order equals global order), all chunks of one length; everything else is derived from that.
Functions here take a layout name (``balanced`` then needs the global ``document_ids``) or a
:class:`ShardLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .documents.balance import balanced_chunks

LAYOUTS = ("contiguous", "zigzag", "balanced")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a known shard layout; valid: {', '.join(LAYOUTS)}")


def chunks_per_rank(layout: str) -> int:
    """Chunks per rank of a named layout (``balanced``: at least 1, chosen from the documents)."""
    check_layout(layout)
    return 2 if layout == "zigzag" else 1


def sequence_divisor(layout: str, world_size: int) -> int:
    """The number the global sequence length must be a multiple of (``balanced``: at least this)."""
    return chunks_per_rank(layout) * world_size


def rank_chunks(layout: str, rank: int, world_size: int) -> tuple[int, ...]:
    """Global chunk indices held by ``rank`` in a layout that depends on the ring size alone, ascending."""
    check_layout(layout)
    if layout == "balanced":
        raise ValueError("layout='balanced' depends on the documents: pass the global document_ids")
    if layout == "contiguous":
        return (rank,)
    return (rank, 2 * world_size - 1 - rank)


@dataclass(frozen=True)
class ShardLayout:
    """Which global chunks every rank of a ring holds: ``chunks[r]`` ascending, all of equal length.

    The engine and the planners read only this, so a layout is data, not a name.
    """

    name: str
    chunks: tuple[tuple[int, ...], ...]

    @classmethod
    def named(cls, layout: str, world_size: int) -> ShardLayout:
        return cls(layout, tuple(rank_chunks(layout, r, world_size) for r in range(world_size)))

    @property
    def world_size(self) -> int:
        return len(self.chunks)

    @property
    def chunks_per_rank(self) -> int:
        return len(self.chunks[0])

    @property
    def num_chunks(self) -> int:
        return self.world_size * self.chunks_per_rank

    def positions(self, n_local: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
        """Global positions (int64) of the ``n_local`` rows ``rank`` holds, in local order."""
        if n_local % self.chunks_per_rank:
            raise ValueError(f"local sequence length {n_local} is not a multiple of {self.chunks_per_rank} "
                             f"({self.name} layout)")
        c = n_local // self.chunks_per_rank
        return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in self.chunks[rank]])


def merge_adjacent_ranks(layout: ShardLayout, group: int) -> ShardLayout:
    """The layout of a ring of ``world_size / group`` ranks whose rank r holds every chunk of ranks
    ``r * group .. r * group + group - 1`` of ``layout``, ascending: what a Ulysses group of adjacent
    sequence-parallel ranks holds together after its all-to-all. Still a layout (equal chunks,
    ascending per rank), so the engine runs it unchanged. ``group=1``: ``layout`` itself."""
    if group == 1:
        return layout
    if layout.world_size % group:
        raise ValueError(f"a group of {group} ranks does not divide the {layout.world_size} ranks of the layout")
    return ShardLayout(layout.name, tuple(
        tuple(sorted(c for rank in range(r * group, (r + 1) * group) for c in layout.chunks[rank]))
        for r in range(layout.world_size // group)
    ))


def merged_order(layout: ShardLayout, group: int, merged_rank: int) -> tuple[int, ...]:
    """For each chunk of ``merged_rank`` in :func:`merge_adjacent_ranks`' layout (ascending): its index
    among the group's chunks laid end to end (member rank order, each member's chunks in local order)."""
    members = [c for rank in range(merged_rank * group, (merged_rank + 1) * group) for c in layout.chunks[rank]]
    return tuple(sorted(range(len(members)), key=members.__getitem__))


def resolve_layout(layout: str | ShardLayout, world_size: int,
                   document_ids: torch.Tensor | None = None) -> ShardLayout:
    """The :class:`ShardLayout` of ``layout`` for a ring of ``world_size``; ``balanced`` is computed
    from the GLOBAL ``document_ids`` ((batch, n) or (n,))."""
    if isinstance(layout, ShardLayout):
        if layout.world_size != world_size:
            raise ValueError(f"the layout has {layout.world_size} ranks, the ring {world_size}")
        return layout
    check_layout(layout)
    if layout != "balanced":
        return ShardLayout.named(layout, world_size)
    if document_ids is None:
        raise ValueError("layout='balanced' needs the global document_ids (it balances the document-mask work)")
    return ShardLayout("balanced", balanced_chunks(document_ids, world_size))


def global_positions(
    n_local: int, layout: str | ShardLayout, rank: int, world_size: int, device: torch.device | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Global positions (int64) of the ``n_local`` rows a rank holds, in local order."""
    return resolve_layout(layout, world_size, document_ids).positions(n_local, rank, device)


def shard_sequence(x: torch.Tensor, dim: int, layout: str | ShardLayout, rank: int, world_size: int,
                   document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The shard of the full-sequence tensor ``x`` (along ``dim``) that ``rank`` holds.

    ``document_ids``: the global ids of packed documents, needed by ``layout='balanced'``.
    """
    shards = resolve_layout(layout, world_size, document_ids)
    n = x.shape[dim]
    if n % shards.num_chunks:
        raise ValueError(
            f"sequence length {n} (dim {dim}) must be a multiple of {shards.num_chunks} for "
            f"layout={shards.name!r} with ring size {world_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, {world_size})")
    pieces = x.chunk(shards.num_chunks, dim=dim)
    return torch.cat([pieces[i] for i in shards.chunks[rank]], dim=dim)


def unshard_sequence(shards: list[torch.Tensor], dim: int, layout: str | ShardLayout,
                     document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Reassemble the full sequence from every rank's shard (index = rank)."""
    shard_layout = resolve_layout(layout, len(shards), document_ids)
    pieces: list[torch.Tensor | None] = [None] * shard_layout.num_chunks
    for rank, shard in enumerate(shards):
        for idx, piece in zip(shard_layout.chunks[rank], shard.chunk(shard_layout.chunks_per_rank, dim=dim)):
            pieces[idx] = piece
    return torch.cat(pieces, dim=dim)  # type: ignore[arg-type]


def gather_sequence(
    x_local: torch.Tensor, dim: int, layout: str | ShardLayout, group: dist.ProcessGroup | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """All-gather every rank's shard and return the full sequence on every rank (no autograd)."""
    if not (dist.is_available() and dist.is_initialized()):
        return unshard_sequence([x_local], dim, layout, document_ids)
    world_size = dist.get_world_size(group)
    bufs = [torch.empty_like(x_local) for _ in range(world_size)]
    dist.all_gather(bufs, x_local.contiguous(), group=group)
    return unshard_sequence(bufs, dim, layout, document_ids)
