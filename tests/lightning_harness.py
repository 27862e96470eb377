"""Helpers for the Lightning tests: data, trainers, and the one-process reference.

Everything here runs inside processes spawned by :func:`ring_plugin.testing.run_in_process_group`, so
one spawned world can run many cases (spawning costs seconds on a small CI machine).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer

from ring_plugin.comm.context import ring_context
from ring_plugin.lightning import RingDeepSpeedStrategy, RingStrategy
from ring_plugin.models import GPTConfig, RingCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DeepSpeed compiles a shared-memory comm op on CPU once (~40 s); cache it inside the (gitignored) repo.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))

VOCAB = 61
TINY = dict(vocab_size=VOCAB, n_layer=2, n_head=3, n_kv_head=1, n_embd=24, max_seq_len=256)


@dataclass
class Case:
    strategy: str  # "ddp" or "deepspeed"
    stage: int = 0
    ring_size: int | None = None
    layout: str = "zigzag"
    model: dict[str, Any] = field(default_factory=lambda: dict(TINY))
    batch_size: int = 1
    seq_len: int = 32
    options: dict[str, Any] = field(default_factory=dict)  # extra strategy arguments
    precision: str = "32-true"  # "64-true": less rounding, which Adam's normalisation amplifies over steps

    def data_parallel(self, world: int) -> int:
        """Replicas reading different samples: the world over the ulysses x ring ranks sharing one."""
        return world // (self.ring_size * self.options.get("ulysses_size", 1)) if self.ring_size else 1

    @property
    def name(self) -> str:
        att = "dilated" if self.model.get("attention_kwargs") else self.model.get("attention", "standard")
        ring = self.ring_size or "all"
        kind = f"deepspeed{self.stage}" if self.strategy == "deepspeed" else self.strategy
        memory = "".join(f"/{k}" for k in ("offload_checkpoints", "mlp_tile_tokens") if self.model.get(k))
        return f"{kind}/ring={ring}/{att}/{self.layout}" + "".join(f"/{k}" for k in sorted(self.options)) + memory


def make_samples(n: int, seq_len: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token samples with pre-shifted labels; some labels ignored so the token counts differ per sample."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq_len + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[torch.rand(n, seq_len, generator=g) < 0.25] = -100
    labels[:, -1] = -100
    return [{"input_ids": ids[i, :-1].clone(), "labels": labels[i]} for i in range(n)]


def make_strategy(case: Case):
    if case.strategy == "ddp":
        return RingStrategy(ring_size=case.ring_size, layout=case.layout, **case.options)
    return RingDeepSpeedStrategy(stage=case.stage, ring_size=case.ring_size, layout=case.layout,
                                 logging_level=40, **case.options)


def make_trainer(case: Case, world: int, max_steps: int, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    warnings.filterwarnings("ignore")
    options: dict[str, Any] = dict(logger=False, enable_progress_bar=False, enable_model_summary=False,
                                   num_sanity_val_steps=0, limit_val_batches=0, precision=case.precision,
                                   enable_checkpointing=False)
    return Trainer(accelerator="cpu", devices=world, strategy=make_strategy(case), max_steps=max_steps,
                   callbacks=callbacks, **{**options, **kwargs})


def make_module(case: Case, seed: int = 0) -> RingCausalLM:
    torch.manual_seed(seed)
    # Small loss chunks so the chunked head/loss runs over several chunks per rank (and under ZeRO-3).
    return RingCausalLM(GPTConfig(**case.model), lr=1e-2, weight_decay=0.1, warmup_steps=2, max_steps=20,
                        loss_chunk_tokens=6)


class GradCapture(Callback):
    """Full (all-reduced, unpartitioned) gradients and the loss of the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is not None:
            return
        if isinstance(trainer.strategy, RingDeepSpeedStrategy):
            from deepspeed.utils import safe_get_full_grad

            # Collective under ZeRO-3: every rank calls it for every parameter.
            self.grads = {n: safe_get_full_grad(p).clone() for n, p in pl_module.named_parameters()}
        else:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"].detach()))


def reference_step(case: Case, samples: list[dict[str, torch.Tensor]]) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one process on the full sequences of ``samples`` (ring size 1)."""
    module = make_module(case)
    ids = torch.stack([s["input_ids"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    with ring_context(None, "contiguous"):  # backward too: checkpointed blocks run their attention again
        logits = module.model(ids, torch.arange(ids.shape[1]))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in module.named_parameters()}


def max_errors(loss: float, grads: dict[str, torch.Tensor], ref_loss: float,
               ref_grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Absolute loss error and the worst gradient error relative to that tensor's largest entry."""
    assert grads.keys() == ref_grads.keys(), (sorted(grads), sorted(ref_grads))
    rel = max(float((grads[n] - r).abs().max() / r.abs().max().clamp_min(1e-12)) for n, r in ref_grads.items())
    return {"loss": abs(loss - ref_loss), "grad_rel": rel}


Sample = dict[str, torch.Tensor]


def first_global_batch(samples: list[Sample], dp: int, batch_size: int) -> list[Sample]:
    """The samples every data-parallel rank reads at step 0 (Lightning's shuffled DistributedSampler, seed 0)."""
    from torch.utils.data import DistributedSampler

    picked = []
    for d in range(dp):
        order = list(DistributedSampler(samples, num_replicas=dp, rank=d, shuffle=True, seed=0))
        picked += [samples[i] for i in order[:batch_size]]
    return picked


def equivalence_case(case: Case, rank: int, world: int) -> dict[str, float] | None:
    """One training step under the strategy vs the one-process reference on the concatenated batch."""
    dp = case.data_parallel(world)
    samples = make_samples(4 * dp * case.batch_size, case.seq_len, seed=1)
    capture = GradCapture()
    from torch.utils.data import DataLoader

    make_trainer(case, world, 1, [capture]).fit(make_module(case), DataLoader(samples, batch_size=case.batch_size))
    if rank != 0:
        return None
    ref_loss, ref_grads = reference_step(case, first_global_batch(samples, dp, case.batch_size))
    return max_errors(capture.losses[0], capture.grads, ref_loss, ref_grads)


def resume_case(case: Case, rank: int, world: int, workdir: str) -> dict[str, list[float]]:
    """Train 5 steps saving every 2; resume from step 2 and train to 5 again: the losses must agree.

    Three batches per epoch, so the checkpoint is mid-epoch and the resumed run crosses an epoch.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    dp = case.data_parallel(world)
    samples = make_samples(3 * dp * case.batch_size, case.seq_len, seed=2)
    ckpt_dir = os.path.join(workdir, case.name.replace("/", "_"))
    full = GradCapture()
    saver = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    loader = DataLoader(samples, batch_size=case.batch_size)
    make_trainer(case, world, 5, [full, saver], enable_checkpointing=True).fit(make_module(case), loader)
    resumed = GradCapture()
    # A differently initialised model: everything must come from the checkpoint.
    make_trainer(case, world, 5, [resumed]).fit(make_module(case, seed=123), loader,
                                                ckpt_path=os.path.join(ckpt_dir, "step=2.ckpt"))
    return {"full": full.losses, "resumed": resumed.losses}


def validate_case(case: Case, rank: int, world: int) -> dict[str, float] | None:
    """``val/loss`` under the strategy vs the one-process token-weighted mean over the whole val set."""
    from torch.utils.data import DataLoader

    samples = make_samples(4, case.seq_len, seed=3)
    trainer = make_trainer(case, world, 1, [], limit_val_batches=None)
    trainer.validate(make_module(case), DataLoader(samples, batch_size=2), verbose=False)
    if rank != 0:
        return None
    ref_loss, _ = reference_step(case, samples)
    return {"loss": abs(float(trainer.callback_metrics["val/loss"]) - ref_loss)}


def run_isolated(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or the exception's text: one failing case must not hide the others' results.
    Read a world's results with :func:`every_rank`, so that a failure on any rank fails the case."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - reported per case by the test
        return f"{type(err).__name__}: {err}"


def every_rank(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case: rank 0's result, unless a rank failed (:func:`run_isolated`'s text); then the first failure,
    prefixed with its rank ("rank 1: ..."), which is no result dict, so the case's test fails. A failure the
    test expects must then be the same on every rank: ranks that fail differently give each one's text."""
    merged: dict[str, Any] = {}
    for key, first in per_rank[0].items():
        failures = {rank: r[key] for rank, r in enumerate(per_rank) if isinstance(r[key], str)}
        if not failures:
            merged[key] = first
        elif len(failures) == len(per_rank) and len(set(failures.values())) == 1:
            merged[key] = first  # the same error on every rank
        else:
            merged[key] = "; ".join(f"rank {rank}: {text}" for rank, text in failures.items())
    return merged


def multihead_case(rank: int, world: int, causal: bool) -> dict[str, float]:
    """RingMultiheadAttention on zigzag shards vs nn.MultiheadAttention on the full sequence: output
    rows and parameter gradients (summed over the ring)."""
    import torch.distributed as dist

    from ring_plugin.layers import RingMultiheadAttention
    from ring_plugin.layout import shard_sequence

    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(30, 5, batch_first=True)
    ring = RingMultiheadAttention(30, 5)
    ring.load_state_dict(ref.state_dict())
    x, weight = torch.randn(2, 16, 30), torch.randn(2, 16, 30)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(16) if causal else None
    expected = ref(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)[0]
    (expected * weight).sum().backward()
    mine = shard_sequence(x, 1, "zigzag", rank, world)
    with ring_context(dist.group.WORLD, "zigzag"):
        got = ring(mine, mine, mine, is_causal=causal)[0]
    (got * shard_sequence(weight, 1, "zigzag", rank, world)).sum().backward()
    grad_err = 0.0
    ref_params = dict(ref.named_parameters())
    for name, p in ring.named_parameters():
        dist.all_reduce(p.grad)
        grad_err = max(grad_err, float((p.grad - ref_params[name].grad).abs().max()))
    out_err = float((got - shard_sequence(expected, 1, "zigzag", rank, world)).abs().max())
    return {"out": out_err, "grad": grad_err}


def make_packed_samples(n: int, seq_len: int, seed: int = 0) -> list[Sample]:
    """Packed samples: documents of random lengths, positions restarting per document, the label that
    crosses a document boundary ignored (-100), and the documents' ids."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        cuts = torch.sort(torch.randperm(seq_len - 1, generator=g)[:4] + 1).values
        starts = torch.zeros(seq_len, dtype=torch.long)
        starts[cuts] = 1
        doc = starts.cumsum(0)
        first = torch.searchsorted(doc, doc)  # index of each token's document start
        ids = torch.randint(0, VOCAB, (seq_len + 1,), generator=g)
        labels = ids[1:].clone()
        labels[torch.cat([doc[1:] != doc[:-1], torch.tensor([True])])] = -100
        samples.append({"input_ids": ids[:-1].clone(), "labels": labels, "document_ids": doc,
                        "position_ids": torch.arange(seq_len) - first})
    return samples


def _global_batch(samples: list[Sample], dp: int, batch_size: int, step: int) -> list[Sample]:
    from torch.utils.data import DistributedSampler

    picked = []
    for d in range(dp):
        order = list(DistributedSampler(samples, num_replicas=dp, rank=d, shuffle=True, seed=0))
        picked += [samples[i] for i in order[step * batch_size:(step + 1) * batch_size]]
    return picked


def _full_weights(module: Any, trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter, whole (ZeRO-3 partitions are gathered: a collective on every rank)."""
    if isinstance(trainer.strategy, RingDeepSpeedStrategy) and trainer.strategy.zero_stage_3:
        import deepspeed

        params = list(module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def packed_training_case(case: Case, rank: int, world: int, steps: int = 3,
                         packed: bool = True) -> dict[str, float] | None:
    """``steps`` optimizer steps on packed documents (or, ``packed=False``, plain sequences) under the
    strategy vs one process training on the whole sequences (positions per document, document masks):
    the final weights must agree."""
    from torch.utils.data import DataLoader

    dp = case.data_parallel(world)
    samples = (make_packed_samples if packed else make_samples)(4 * dp * case.batch_size, case.seq_len, seed=4)
    module = make_module(case)
    trainer = make_trainer(case, world, steps, [])
    trainer.fit(module, DataLoader(samples, batch_size=case.batch_size))
    weights = _full_weights(module, trainer)
    if rank != 0:
        return None
    ref = make_module(case).to(weights[next(iter(weights))].dtype)
    setup = ref.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    for step in range(steps):
        batch = {k: torch.stack([s[k] for s in _global_batch(samples, dp, case.batch_size, step)])
                 for k in samples[0]}
        with ring_context(None, "contiguous"):
            logits = ref.model(batch["input_ids"], batch.get("position_ids", torch.arange(case.seq_len)),
                               batch.get("document_ids"))
        F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    errors = {n: float((weights[n] - p.detach()).abs().max()) for n, p in ref.named_parameters()}
    moved = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(ref.parameters(),
                                                                             make_module(case).parameters()))
    return {"weight_abs": max(errors.values()), "moved": moved}
