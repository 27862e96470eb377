"""transformers' ``Trainer`` on the ring (``ring_plugin.hf.RingTrainer``): a few SGD steps of a tiny
Llama (GQA) on rings of 2 (and 2 rings of 2) end with the weights of one process training on the whole
sequences, with and without gradient accumulation, and on packed samples (each document on its own);
the evaluation loss is the one-process loss; the same with the tiled loss, tiled MLPs and offloaded
checkpoints switched on."""

from __future__ import annotations

import tempfile

import pytest
import torch

from ring_plugin.testing import run_in_process_group
from tests.hf_harness import rel_err, tiny_model, token_batch

SAMPLES, LENGTH, LR = 8, 32, 0.5
DOCUMENTS = (11, 5, 16)  # packed samples: documents cut across chunks and ranks
# Every long-context switch on, with tiles shorter than a rank's 16 tokens.
LONG_CONTEXT = dict(tiled_loss=True, mlp_tile_tokens=5, offload_checkpoints=True, loss_tile_tokens=6)


def _dataset(packed: bool = False) -> list[dict[str, torch.Tensor]]:
    batch = token_batch(SAMPLES, LENGTH, seed=3)
    if packed:  # HF-style packing: position_ids restart at 0 in each document
        batch["position_ids"] = torch.cat([torch.arange(n) for n in DOCUMENTS]).expand(SAMPLES, -1)
    return [{k: v[i] for k, v in batch.items()} for i in range(SAMPLES)]


def _documents(sample: dict[str, torch.Tensor], packed: bool) -> list[dict[str, torch.Tensor]]:
    """The sample's documents, each a sequence of its own (the whole sample when not packed)."""
    bounds = torch.tensor((0, *DOCUMENTS)).cumsum(0).tolist() if packed else [0, LENGTH]
    return [{k: sample[k][a:b] for k in ("input_ids", "labels")} for a, b in zip(bounds, bounds[1:])]


def _arguments(out: str, accumulation: int, steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, use_cpu=True, per_device_train_batch_size=1,
                             per_device_eval_batch_size=2, gradient_accumulation_steps=accumulation,
                             max_steps=steps, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
                             warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, seed=0, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0)


def _one_process(order: list[list[int]], steps: int, accumulation: int, replicas: int,
                 packed: bool) -> dict[str, torch.Tensor]:
    """Plain SGD in one process: each optimizer step averages the token losses of its micro-batches
    (``accumulation`` per replica, ``replicas`` replicas) over all their labelled tokens; a packed
    sample's documents run as separate sequences (no label across a document boundary)."""
    model, data = tiny_model("llama", "eager"), _dataset(packed)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    per_step = accumulation * replicas
    for step in range(steps):
        samples = [data[i] for replica in order for i in replica[step * accumulation:(step + 1) * accumulation]]
        assert len(samples) == per_step
        docs = [d for s in samples for d in _documents(s, packed)]
        count = sum(int((d["labels"][1:] != -100).sum()) for d in docs)
        for d in docs:
            logits = model(input_ids=d["input_ids"][None], use_cache=False).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, d["labels"][1:], ignore_index=-100, reduction="sum")
            (loss / count).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _ring_trainer(rank: int, world: int, ring_size: int, accumulation: int, steps: int, packed: bool,
                  long_context: bool = False) -> dict:
    from torch.utils.data import DistributedSampler

    import ring_plugin.hf  # noqa: F401
    from ring_plugin.hf.trainer import RingTrainer

    with tempfile.TemporaryDirectory() as out:
        trainer = RingTrainer(model=tiny_model("llama", "ring"), args=_arguments(out, accumulation, steps),
                              train_dataset=_dataset(packed), eval_dataset=_dataset()[:4], ring_size=ring_size,
                              **(LONG_CONTEXT if long_context else {}))
        trainer.train()
        evaluation = trainer.evaluate()
    replicas = world // ring_size
    # The sample order each ring read (its data-parallel rank's share of the seeded shuffle).
    order = [list(DistributedSampler(_dataset(), num_replicas=replicas, rank=r, shuffle=True, seed=0))
             for r in range(replicas)]
    # numpy arrays travel back by value (shared-memory tensors need their process alive).
    weights = {n: p.detach().numpy().copy() for n, p in trainer.model.named_parameters()}
    return {"weights": weights, "order": order, "eval_loss": evaluation["eval_loss"]}


def _eval_loss_one_process(weights: dict[str, torch.Tensor]) -> float:
    model, data = tiny_model("llama", "eager"), _dataset()[:4]
    model.load_state_dict(weights, strict=False)  # the trained weights (tied buffers aside)
    model.eval()
    with torch.no_grad():  # the Trainer averages per-batch losses: 2 batches of 2 samples
        losses = [float(model(input_ids=torch.stack([s["input_ids"] for s in pair]),
                              labels=torch.stack([s["labels"] for s in pair])).loss)
                  for pair in (data[:2], data[2:])]
    return sum(losses) / 2


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world, ring_size, accumulation, packed, long_context",
                         [(2, 2, 1, False, False), (2, 2, 2, False, False), (4, 2, 1, False, False),
                          (2, 2, 1, True, False), (2, 2, 2, True, True)])
def test_ring_trainer_equals_one_process(world, ring_size, accumulation, packed, long_context):
    steps = 2
    results = run_in_process_group(_ring_trainer, world, ring_size, accumulation, steps, packed, long_context,
                                   timeout=240, reuse=True)
    order = results[0]["order"]
    expected = _one_process(order, steps, accumulation, world // ring_size, packed)
    for rank, result in enumerate(results):
        for name, ref in expected.items():
            assert rel_err(torch.from_numpy(result["weights"][name]), ref) <= 1e-5, (rank, name)
    moved = max(rel_err(expected[n], p.detach()) for n, p in tiny_model("llama", "eager").named_parameters())
    assert moved > 1e-3  # the steps changed the weights, so the comparison means something
    if world == ring_size:
        assert results[0]["eval_loss"] == pytest.approx(_eval_loss_one_process(expected), rel=1e-5)
