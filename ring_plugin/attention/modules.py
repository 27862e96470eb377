"""The ring attention layers users build: one base class over the engine, variants as small subclasses.

Call convention for every variant: ``attn(q, k, v, is_causal=False)`` with local shards shaped
``(batch, n_local, heads, head_dim)``; returns the local output shard, shaped like ``q``.
``k``/``v`` may have fewer heads than ``q`` (grouped-query attention): only those travel.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..cache import BoundedCache
from ..comm.agreement import agree_or_raise
from ..comm.collectives import all_gather_sequence
from ..comm.context import RingContext, resolve_ring
from ..comm.ring import RingComm, RingStats
from ..config import RingAttentionConfig
from ..documents.blocks import RingDocuments
from ..documents.ids import document_ids_error
from ..layout import sequence_divisor, unshard_sequence
from ..ops.kernels import default_scale, select_kernel
from ..patterns.blocks import Pattern
from ..patterns.dilated import DilatedPattern
from ..shard_plan import SequenceShards, gather_shards, ids_order_check, layer_document_ids_error
from .call import RingCall
from .dense_ring import DenseRingAttention
from .exchange import ExchangePlan, build_exchange_plan
from .oracle import document_mask, reference_attention
from .peer_ring import PeerRingAttention
from .ulysses import ulysses_attend

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class RingAttentionBase(nn.Module):
    """Shared construction, validation and ring resolution. Subclasses implement :meth:`_attend`."""

    variant: ClassVar[str] = "base"
    takes_masks: ClassVar[bool] = False  # document_ids= and sliding_window= (the dense ring's variants)
    accepts_flex: ClassVar[bool] = False  # backend='flex' (block-sparse only)

    def __init__(
        self,
        segment_lengths: list[int] | None = None,
        dilation_rates: list[int] | None = None,
        dropout: float | None = None,
        ring_size: int | None = None,
        *,
        config: RingAttentionConfig | None = None,
        process_group: Any = None,
        **overrides: Any,
    ):
        super().__init__()
        base = config if config is not None else RingAttentionConfig()
        explicit = {
            name: value
            for name, value in (
                ("segment_lengths", segment_lengths),
                ("dilation_rates", dilation_rates),
                ("dropout", dropout),
                ("ring_size", ring_size),
            )
            if value is not None
        }
        self.config = base.replace(**explicit, **overrides)
        self.process_group = process_group
        self.stats = RingStats()
        self._check_config()
        self._pattern: Pattern | None = self.build_pattern()

    def build_pattern(self) -> Pattern | None:
        """The attention pattern (None = dense): dilated when ``segment_lengths`` are given."""
        c = self.config
        if c.segment_lengths is not None and c.dilation_rates is not None:
            return DilatedPattern(c.segment_lengths, c.dilation_rates)
        return None

    @property
    def pattern(self) -> Pattern | None:
        return self._pattern

    def _check_config(self) -> None:
        """Variant-specific checks at construction (dense variants accept every valid config)."""
        if self.config.backend == "flex" and not self.accepts_flex:
            raise ValueError(
                f"backend='flex' selects the gathered block-sparse path and is valid for the 'block_sparse' "
                f"variant only; the {self.variant!r} variant takes a kernel backend ('auto', 'cudnn', ...)"
            )

    # -------------------------------------------------------------------------------- forward
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
        document_ids: torch.Tensor | SequenceShards | None = None, sliding_window: int | None = None,
    ) -> torch.Tensor:
        """``document_ids``: packed documents; a query then attends only to keys of its own document (and
        causally if ``is_causal``). Either the batch's shard plan (:class:`~ring_plugin.shard_plan.SequenceShards`,
        made once where the batch was cut, by the strategies, ``ring_plugin.hf.shard_batch`` or
        ``ring_plugin.sequence_shards``), or this rank's shard ``(batch, n_local)`` (int64, same layout as
        ``q``) of the global, non-decreasing document numbers: the slow path, which builds the plan in
        every call (an all-gather of the ids and, for ``layout="balanced"``, a search for the layout).
        ``sliding_window=W`` (causal only): a query at position p sees keys at positions
        ``p - W < position <= p`` (Mistral / Qwen2 local windows)."""
        ring, plan = self.resolve_ring(), document_ids if isinstance(document_ids, SequenceShards) else None
        documents = plan.documents if plan is not None else document_ids
        across = self.config.check_inputs_across_ranks
        error = (self._input_error(q, k, v, ring) or self._documents_error(document_ids, q, ring, not across)
                 or self._window_error(sliding_window, is_causal, documents))
        signature = (*_signature(q, k), documents is not None, sliding_window or 0) if error is None else ()
        agreed = plan is not None and plan.agreed(("layer", signature))
        if error and agreed:
            raise ValueError(error)  # the peers agreed this step's inputs already and do not wait for a verdict
        if across and not agreed:
            # Every check above ran before this first collective, so a bad input on any rank becomes the same
            # ValueError on every rank. All ranks run one step's layers in one order: one agreement per plan.
            order = ids_order_check(document_ids if isinstance(document_ids, torch.Tensor) and error is None else None)
            agree_or_raise(error, signature, ring.sequence_group, _device_of(q, ring), self.comm_timeout, order)
            if plan is not None:
                plan.mark_agreed(("layer", signature))
        elif error:
            raise ValueError(error)
        masks: dict[str, Any] = {}  # subclasses that take neither mask keep the plain call shape
        if isinstance(document_ids, torch.Tensor):
            plan = gather_shards(document_ids, ring.sequence_group, ring.layout, ring.sequence_rank,
                                 ring.sequence_size, ring.ulysses_size)
        if plan is not None and plan.documents is not None:
            masks["documents"] = plan.documents
        if sliding_window is not None:
            masks["window"] = int(sliding_window)
        if ring.ulysses_size > 1:
            return ulysses_attend(self._attend, q, k, v, bool(is_causal), ring, **masks)
        return self._attend(q, k, v, bool(is_causal), ring, **masks)

    def prepare_documents(self, document_ids: torch.Tensor) -> SequenceShards:
        """The slow path's plan of this rank's ``document_ids`` shard, built once for every layer of a step
        (pass it as ``document_ids=``); a cut batch carries its plan already. Bad ids raise on every rank."""
        ring = self.resolve_ring()
        across = self.config.check_inputs_across_ranks
        error = self._dense_only_error("document_ids are") or document_ids_error(document_ids, check_order=not across)
        if across:
            ids = document_ids if error is None else None
            agree_or_raise(error, tuple(document_ids.shape) if error is None else (), ring.sequence_group,
                           _device_of(document_ids, ring), self.comm_timeout, ids_order_check(ids))
        elif error:
            raise ValueError(error)
        return gather_shards(document_ids, ring.sequence_group, ring.layout, ring.sequence_rank, ring.sequence_size,
                             ring.ulysses_size)

    def _window_error(self, window: object, is_causal: bool, document_ids: object) -> str | None:
        if window is None:
            return None
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            return f"sliding_window={window!r} must be a positive integer (keys at most W - 1 positions back)"
        if not is_causal:
            return f"sliding_window={window} is a causal window: call with is_causal=True"
        if document_ids is not None:
            return "sliding_window together with document_ids is not supported yet; pass one of them"
        return self._dense_only_error("sliding_window is")

    def _documents_error(self, document_ids: object, q: torch.Tensor, ring: RingContext,
                         check_order: bool = True) -> str | None:
        if document_ids is None:
            if ring.layout == "balanced":
                return "layout='balanced' needs document_ids: it is the layout of packed documents"
            return None
        error = self._dense_only_error("document_ids are")
        if error is None and isinstance(document_ids, SequenceShards):
            return document_ids.use_error(q.shape[0], q.shape[1], ring.layout, ring.sequence_rank,
                                          ring.sequence_size, ring.ulysses_size)
        return error or layer_document_ids_error(document_ids, q, check_order)

    def _dense_only_error(self, subject: str) -> str | None:
        """Documents and windows restrict the dense ring's blocks, and the Ulysses all-to-all moves heads
        and rows: variants with a pattern (whose heads or rows mean something), or that reorder tokens
        (Hilbert), would get them wrong, so they refuse by name."""
        if self.takes_masks and self.pattern is None:
            return None
        return (f"{subject} supported by the dense variants (standard, sdpa, distributed, correct), not by "
                f"{self.variant!r}" + (" with its pattern" if self.pattern is not None else ""))

    def resolve_ring(self) -> RingContext:
        """The ring this forward runs on (single-device layers override this)."""
        c = self.config
        return resolve_ring(self.process_group, c.ring_size, c.layout, c.ulysses_size, self.comm_timeout)

    def _input_error(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: RingContext) -> str | None:
        """A message naming what is wrong with this rank's inputs, or None."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                return f"{name} must be a torch.Tensor, got {type(t).__name__}"
            if t.dim() != 4:
                return f"{name} must be 4-D (batch, n_local, heads, head_dim), got shape {tuple(t.shape)}"
        if q.dtype not in _FLOAT_DTYPES:
            return f"q has dtype {q.dtype}; ring attention takes floating point inputs"
        if k.dtype != q.dtype or v.dtype != q.dtype:
            return f"q, k, v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}"
        if not (q.device == k.device == v.device):
            return f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
        if k.shape != v.shape:
            return f"k and v must have the same shape, got k={tuple(k.shape)}, v={tuple(v.shape)}"
        if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
            return (
                f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch, n_local and head_dim "
                "(layout: batch, n_local, heads, head_dim)"
            )
        if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
            return f"k/v heads ({k.shape[2]}) must divide q heads ({q.shape[2]}) for grouped-query attention"
        divisor = sequence_divisor(ring.layout, 1)
        if q.shape[1] == 0 or q.shape[1] % divisor:
            return (
                f"local sequence length {q.shape[1]} must be a positive multiple of {divisor} for "
                f"layout={ring.layout!r} (global length = n_local x sequence-parallel size {ring.sequence_size})"
            )
        if self.config.dropout > 0 and self.training:
            return (
                f"dropout={self.config.dropout} is not supported by the ring engine in training "
                "(it would not match the oracle); set dropout=0.0 or call .eval()"
            )
        if ring.ulysses_size > 1:
            error = self._dense_only_error("ulysses_size > 1 is")
            if error or q.shape[2] % ring.ulysses_size:
                return error or (f"q heads ({q.shape[2]}) must be a multiple of ulysses_size={ring.ulysses_size}: "
                                 "each rank of a Ulysses group attends H / ulysses_size heads")
        return self._pattern_error(q.shape[1] * ring.sequence_size, q.shape[2], ring)

    def _pattern_error(self, n_global: int, heads: int, ring: RingContext) -> str | None:
        """Variant-specific checks of the global length (e.g. segment divisibility)."""
        if self.pattern is None:
            return None
        return self.pattern.error(n_global, n_global // sequence_divisor(ring.layout, ring.sequence_size), heads)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, ring: RingContext,
        documents: RingDocuments | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------------------- helpers
    default_timeout: ClassVar[float | None] = None

    @property
    def comm_timeout(self) -> float | None:
        """Seconds to wait for a ring peer (``config.comm_timeout``, else the variant's default)."""
        return self.config.comm_timeout if self.config.comm_timeout is not None else self.default_timeout

    def scale_for(self, head_dim: int) -> float:
        return self.config.softmax_scale or default_scale(head_dim)

    def get_communication_stats(self) -> dict[str, float]:
        return self.stats.as_dict()

    def extra_repr(self) -> str:
        c = self.config
        return (f"variant={self.variant}, backend={c.backend}, layout={c.layout}, ring_size={c.ring_size}"
                + (f", ulysses_size={c.ulysses_size}" if c.ulysses_size is not None else ""))


def _signature(q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
    """What every rank of a ring must agree on: shapes and dtype (valid inputs only)."""
    return (*q.shape, *k.shape[2:], _FLOAT_DTYPES.index(q.dtype))


def _device_of(q: Any, ring: RingContext) -> torch.device:
    """Where the agreement's message lives: q's device, or (q not a tensor) the ring backend's."""
    if isinstance(q, torch.Tensor):
        return q.device
    backend = str(torch.distributed.get_backend(ring.group)) if ring.group is not None else "gloo"
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class RingEngineAttention(RingAttentionBase):
    """A variant that runs the ring engine with a kernel chosen by ``backend``: the dense ring
    (:mod:`.dense_ring`), or a pattern's peer rounds (:mod:`.peer_ring`) over the layer's
    :class:`~.exchange.ExchangePlan`."""

    follow_sdpa_flags: ClassVar[bool] = False
    stats_by_default: ClassVar[bool] = False
    takes_masks = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._plans: BoundedCache[Any] = BoundedCache(32)  # exchange plans, keyed by what defines them

    def _attend(self, q, k, v, causal, ring, documents=None, window=None):
        # The dense ring keeps q/k/v sequence-major, as the module receives them ((B, L, H, D) memory,
        # read as (B, H, L, D) views): the kernels take strided views as SDPA does, K/V travel as their
        # own memory, and the output, dout and gradients stay in that layout, so nothing is transposed
        # into a copy. Patterns read strided views of all three (and copy only where they gather rows).
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        call = self.ring_call(q, k, causal, ring, documents=documents, window=window)
        if self.pattern is None:
            kt, vt = (t.contiguous().transpose(1, 2) for t in (k, v))  # whole (B, L, H, D) rows travel
            out = DenseRingAttention.apply(qt, kt, vt, call)
        else:
            out = PeerRingAttention.apply(qt, kt, vt, call, self.exchange_plan(call, q.shape[1]))
        return out.transpose(1, 2)

    def plan_key(self, call: RingCall, n_local: int, *extra: Any) -> tuple:
        """What defines this layer's plans for a call: ring geometry, causality, shapes."""
        return (call.layout.chunks, call.comm.rank, n_local, call.causal, call.heads, call.kv_heads, *extra)

    def exchange_plan(self, call: RingCall, n_local: int) -> ExchangePlan:
        """The pattern's row-exchange plan for this call (built once per geometry)."""
        assert self.pattern is not None
        return self._plans.get(self.plan_key(call, n_local, "exchange"),
                               lambda: build_exchange_plan(self.pattern, call, n_local))

    @property
    def collects_stats(self) -> bool:
        c = self.config.collect_stats
        return self.stats_by_default if c is None else c

    def ring_call(
        self, q: torch.Tensor, k: torch.Tensor, causal: bool, ring: RingContext, backend: str | None = None,
        documents: RingDocuments | None = None, window: int | None = None,
    ) -> RingCall:
        """The engine's call for ``(batch, n_local, heads, head_dim)`` inputs (``backend``: the kernel
        backend, default ``config.backend``)."""
        kernel = select_kernel(
            backend or self.config.backend, q.device, q.dtype, q.shape[-1], follow_sdpa_flags=self.follow_sdpa_flags
        )
        return RingCall(
            comm=RingComm(ring.group, stats=self.stats if self.collects_stats else None, timeout=self.comm_timeout),
            layout=documents.layout if documents is not None else ring.engine_layout(),
            kernel=kernel,
            scale=self.scale_for(q.shape[-1]),
            causal=causal,
            heads=q.shape[2],
            kv_heads=k.shape[2],
            grad_dtype=torch.float32 if self.config.grad_comm_dtype == "float32" else q.dtype,
            documents=documents,
            window=window,
        )


class StandardRingAttention(RingEngineAttention):
    """The ring engine with the kernel backend from ``config.backend``: dense (causal or not), or
    LongNet dilated attention when ``segment_lengths``/``dilation_rates`` are given."""

    variant = "standard"


class RingDilatedAttentionSDPA(RingEngineAttention):
    """The ring engine whose per-step kernel is picked the way ``scaled_dot_product_attention`` picks:
    it honours ``torch.nn.attention.sdpa_kernel`` and the ``torch.backends.cuda.*_sdp`` switches."""

    variant = "sdpa"
    follow_sdpa_flags = True


class DistributedRingAttention(RingEngineAttention):
    """The ring engine plus per-step communication statistics (``.stats``) and a peer timeout.

    ``stats.bytes_sent``, ``stats.wait_seconds`` (time blocked on the ring) and
    ``stats.compute_seconds`` accumulate over forward and backward; ``comm_timeout`` (default 300 s)
    turns a dead peer into a :class:`~ring_plugin.comm.ring.RingTimeoutError`.
    """

    variant = "distributed"
    stats_by_default = True
    default_timeout = 300.0


class RingDilatedAttentionCorrect(RingAttentionBase):
    """The oracle as a module: all-gathers the sequence and computes exactly in fp32 (or fp64).

    Slow and O(n) memory per rank on purpose; every other variant is tested against it.
    """

    variant = "correct"

    takes_masks = True

    def _attend(self, q, k, v, causal, ring, documents=None, window=None):
        layout = documents.layout if documents is not None else ring.engine_layout()
        full = [all_gather_sequence(t, 1, layout, ring.group) for t in (q, k, v)]
        allowed = self.allowed_pairs(full[0].shape[1], full[0].shape[2], q.device)
        if documents is not None:  # no pattern here: the document mask alone
            allowed = document_mask(unshard_sequence(list(documents.by_rank), 1, layout)).to(q.device)
        if window is not None:
            pos = torch.arange(full[0].shape[1], device=q.device)
            allowed = pos[:, None] - pos[None, :] < window  # with causal: the last `window` keys
        compute = torch.float64 if self.config.oracle_dtype == "float64" else torch.float32
        out = reference_attention(
            *full, causal=causal, scale=self.scale_for(q.shape[-1]), allowed=allowed, compute_dtype=compute
        )
        rows = layout.positions(q.shape[1], ring.rank, device=q.device)
        return out.index_select(1, rows)

    def allowed_pairs(self, n: int, heads: int, device: torch.device) -> torch.Tensor | None:
        """The (heads, n, n) or (n, n) mask of permitted pairs (bool), or how many times each key
        counts (int, dilated pairs); None for dense attention."""
        return None if self.pattern is None else self.pattern.counts(n, heads, device)


# Names users of the predecessor library already know.
RingDilatedAttention = StandardRingAttention
RingDilatedAttentionProduction = StandardRingAttention
