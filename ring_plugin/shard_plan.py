"""The shard plan of a batch: made once where the batch is cut, carried with it to every attention call.

A :class:`SequenceShards` holds the layout the batch was cut in (over the sequence-parallel group),
this rank's place in the mesh (sequence rank, Ulysses group, ring), the global positions of its
tokens and, for packed data, every rank's document ids with the blocks the ring computes from them.
It is made from the GLOBAL batch, which every rank of a sequence group holds whole before cutting,
so every rank builds the same plan with no communication and no search for the layout:

* the strategies' batch sharding and ``ring_plugin.hf.shard_batch`` put it in the batch under
  ``"sequence_shards"`` (:func:`cut_batch`);
* a plain loop calls :func:`sequence_shards` with the global ids;
* a layer given raw ``document_ids`` (this rank's shard) builds one itself: one all-gather of the ids
  and, for ``layout="balanced"``, a search for the chunk count the shards were cut with. That is the
  slow path; the plan removes both.

A layer takes the plan as ``document_ids=plan`` (RingGPT, the HF adapter and ``RingMultiheadAttention``
pass it that way). The plan belongs to one batch: a layer refuses it for another ring, layout, rank
or shape, and a model refuses it next to document ids of another batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
import torch.distributed as dist

from .comm.context import resolve_ring
from .documents.balance import balanced_chunks, chunk_counts
from .documents.blocks import RingDocuments, global_ids
from .documents.ids import document_ids_error
from .layout import ShardLayout, resolve_layout, shard_sequence

SHARDS_KEY = "sequence_shards"  # where a cut batch carries its plan


class SequenceShards:
    """The shard plan of one batch (see the module docstring). ``documents`` is None for dense data."""

    def __init__(self, layout: ShardLayout, sequence_rank: int, ulysses_size: int = 1,
                 documents: RingDocuments | None = None):
        if not 0 <= sequence_rank < layout.world_size:
            raise ValueError(f"sequence_rank={sequence_rank} must lie in [0, {layout.world_size})")
        if ulysses_size < 1 or layout.world_size % ulysses_size:
            raise ValueError(f"ulysses_size={ulysses_size} must divide the sequence-parallel size {layout.world_size}")
        self.layout = layout
        self.sequence_rank = sequence_rank
        self.ulysses_size = ulysses_size
        self.documents = documents
        # Input signatures the ranks already agreed on with this plan: every rank runs the same layers
        # in the same order on it, so each signature is agreed once per step, not once per layer.
        self._agreed: set[Hashable] = set()

    @property
    def sequence_size(self) -> int:
        return self.layout.world_size

    @property
    def ring_rank(self) -> int:
        return self.sequence_rank // self.ulysses_size

    @property
    def ulysses_rank(self) -> int:
        return self.sequence_rank % self.ulysses_size

    @property
    def local_ids(self) -> torch.Tensor | None:
        """This rank's document ids (B, n_local), CPU; None for dense data."""
        return None if self.documents is None else self.documents.by_rank[self.sequence_rank]

    def positions(self, n_local: int, device: torch.device | None = None) -> torch.Tensor:
        """Global positions (int64) of this rank's ``n_local`` tokens, in local order."""
        return self.layout.positions(n_local, self.sequence_rank, device)

    def use_error(self, batch: int, n_local: int, layout: str, sequence_rank: int, sequence_size: int,
                  ulysses_size: int) -> str | None:
        """What is wrong with using this plan for a (batch, n_local) input of a layer whose ring is
        described by the other arguments, or None."""
        mine = (self.layout.name, self.sequence_size, self.ulysses_size, self.sequence_rank)
        theirs = (layout, sequence_size, ulysses_size, sequence_rank)
        if mine != theirs:
            return ("the batch's shard plan (layout, sequence-parallel size, ulysses_size, rank) = "
                    f"{mine} does not match the layer's ring {theirs}: cut the batch with the ring's layout "
                    "(the layout is a model-wide choice) and pass each rank its own plan")
        if self.documents is not None and tuple(self.documents.by_rank.shape[1:]) != (batch, n_local):
            return (f"the shard plan was made for (batch, n_local) = {tuple(self.documents.by_rank.shape[1:])}, "
                    f"the input has {(batch, n_local)}: a plan belongs to the batch it was cut from")
        return None

    def ids_error(self, document_ids: object) -> str | None:
        """Whether ``document_ids`` (this rank's shard, given next to the plan) are the plan's own.
        Compared on the host (once per step): a plan reused for another batch is refused."""
        if document_ids is None or document_ids is self.local_ids:
            return None
        if self.local_ids is None:
            return "document_ids were given with a shard plan of dense data: cut the batch with its document_ids"
        if not isinstance(document_ids, torch.Tensor) or not torch.equal(document_ids.cpu(), self.local_ids):
            return ("document_ids differ from those of the batch's shard plan: a plan belongs to the batch it was "
                    "cut from (cut each batch anew: ring_plugin.sequence_shards / shard_batch)")
        return None

    def agreed(self, signature: Hashable) -> bool:
        return signature in self._agreed

    def mark_agreed(self, signature: Hashable) -> None:
        self._agreed.add(signature)

    def __repr__(self) -> str:
        docs = "dense" if self.documents is None else f"{self.documents.by_rank.shape[1:]} document ids"
        return (f"SequenceShards(layout={self.layout.name!r}, sequence_rank={self.sequence_rank} of "
                f"{self.sequence_size}, ulysses_size={self.ulysses_size}, {docs})")


def plan_shards(layout: str | ShardLayout, sequence_rank: int, sequence_size: int,
                document_ids: torch.Tensor | None = None, ulysses_size: int = 1) -> SequenceShards:
    """The plan of a batch cut over ``sequence_size`` ranks in ``layout``, from its GLOBAL
    ``document_ids`` ((batch, n); None for dense data). Checked here once for the whole step."""
    if document_ids is None:
        if layout == "balanced":
            raise ValueError("layout='balanced' balances packed documents: the batch needs 'document_ids' "
                             "(batch, length)")
        return SequenceShards(resolve_layout(layout, sequence_size), sequence_rank, ulysses_size)
    error = document_ids_error(document_ids)
    if error:
        raise ValueError(error)
    ids = document_ids.cpu()
    shards = resolve_layout(layout, sequence_size, ids)
    by_rank = torch.stack([shard_sequence(ids, 1, shards, r, sequence_size) for r in range(sequence_size)])
    return SequenceShards(shards, sequence_rank, ulysses_size, RingDocuments(by_rank, shards))


def sequence_shards(document_ids: torch.Tensor | None = None, group: dist.ProcessGroup | None = None,
                    layout: str | None = None) -> SequenceShards:
    """The shard plan for a plain loop: this rank's place in the active ring (``group``/``layout``, else
    the active ring context, else the default group) and the batch's GLOBAL ``document_ids``. Pass it as
    ``document_ids=`` to the layers (or a model's forward) for this batch."""
    ring = resolve_ring(group, None, layout)
    return plan_shards(ring.layout, ring.sequence_rank, ring.sequence_size, document_ids, ring.ulysses_size)


def gather_shards(ids: torch.Tensor, group: dist.ProcessGroup | None, layout: str, sequence_rank: int,
                  sequence_size: int, ulysses_size: int = 1) -> SequenceShards:
    """The slow path: a plan from this rank's shard of the ids, all-gathered over the sequence group
    and checked to form one non-decreasing global sequence (the same verdict on every rank, since all
    judge the same gathered ids); a ``balanced`` layout is found again from the shards."""
    ids = ids.contiguous()
    if group is None or sequence_size == 1:
        by_rank = ids.cpu()[None]
    else:
        parts = [torch.empty_like(ids) for _ in range(sequence_size)]
        dist.all_gather(parts, ids, group=group)
        by_rank = torch.stack(parts).cpu()
    shards = _balanced_layout(by_rank) if layout == "balanced" else ShardLayout.named(layout, sequence_size)
    if bool((global_ids(by_rank, shards).diff(dim=1) < 0).any()):
        raise ValueError(
            "document_ids of the ring's shards do not form one non-decreasing sequence in the "
            f"{layout!r} layout: each rank must pass its own shard of the same global document_ids"
        )
    return SequenceShards(shards, sequence_rank, ulysses_size, RingDocuments(by_rank, shards))


def _balanced_layout(by_rank: torch.Tensor) -> ShardLayout:
    """The balanced layout the shards were cut in, rebuilt from the shards alone.

    For each chunk count the balancer could have chosen, cut every shard into its chunks and put the
    chunks in global order: ids never decrease, so ordering chunks by their (first, last) ids per
    sample is the global order, up to chunks that hold one document only, which are interchangeable
    as ids. The balancer, a pure function of those global ids, then names each chunk's position; the
    count whose layout reproduces every shard is the one used.
    """
    world, batch, n_local = by_rank.shape
    for c in chunk_counts(world * n_local, world):
        if n_local % c:
            continue
        chunk = n_local // c
        pieces = by_rank.view(world, batch, c, chunk).permute(0, 2, 1, 3).reshape(world * c, batch, chunk)
        key = torch.stack([pieces[:, :, 0], pieces[:, :, -1]], dim=2).reshape(world * c, -1).tolist()
        order = sorted(range(world * c), key=lambda i: key[i])
        ids = pieces[order].permute(1, 0, 2).reshape(batch, -1)
        if bool((ids.diff(dim=1) < 0).any()):
            continue  # not this chunk count: its chunks do not line up into one sequence
        shards = ShardLayout("balanced", balanced_chunks(ids, world))
        if shards.chunks_per_rank == c and torch.equal(global_ids(by_rank, shards), ids):
            return shards
    raise ValueError(
        "document_ids of the ring's shards are not a layout='balanced' sharding of one global sequence: "
        "shard every tensor with shard_sequence(x, 1, 'balanced', rank, world_size, document_ids=global_ids)"
    )


def layer_document_ids_error(ids: object, q: torch.Tensor, check_order: bool = True) -> str | None:
    """This rank's check of its ``document_ids`` shard: the library's check of document ids, and the
    shape of ``q``'s first two dims ``(batch, n_local)`` (``check_order=False``: not their order,
    which :func:`document_ids_decrease` then checks on the device)."""
    error = document_ids_error(ids, check_order=check_order)
    if error is None and tuple(ids.shape) != tuple(q.shape[:2]):  # type: ignore[union-attr]
        error = (f"document_ids must have shape (batch, n_local) = {tuple(q.shape[:2])} like q's first two dims, "
                 f"got {tuple(ids.shape)}")  # type: ignore[union-attr]
    return error


def document_ids_decrease(ids: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on the ids' device: whether they decrease anywhere along a row (no host sync)."""
    if ids.shape[1] < 2:
        return torch.zeros((), dtype=torch.bool, device=ids.device)
    return (ids[:, 1:] < ids[:, :-1]).any()


def ids_order_check(ids: torch.Tensor | None) -> tuple[torch.Tensor, Callable[[], str]] | None:
    """The ids' order, checked on the device; its verdict travels with the input agreement, so it costs
    no host sync of its own (None: nothing to check)."""
    if ids is None:
        return None
    return document_ids_decrease(ids), lambda: document_ids_error(ids) or "document_ids must be non-decreasing"
