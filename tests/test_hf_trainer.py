"""transformers' ``Trainer`` on the ring (``ring_plugin.hf.RingTrainer``): a few SGD steps of a tiny
Llama (GQA) on rings of 2 (and 2 rings of 2) end with the weights of one process training on the whole
sequences, with and without gradient accumulation; the evaluation loss is the one-process loss."""

from __future__ import annotations

import tempfile

import pytest
import torch

from ring_plugin.testing import run_in_process_group
from tests.hf_harness import rel_err, tiny_model, token_batch

pytest.importorskip("transformers")

SAMPLES, LENGTH, LR = 8, 32, 0.5


def _dataset() -> list[dict[str, torch.Tensor]]:
    batch = token_batch(SAMPLES, LENGTH, seed=3)
    return [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in range(SAMPLES)]


def _arguments(out: str, accumulation: int, steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, use_cpu=True, per_device_train_batch_size=1,
                             per_device_eval_batch_size=2, gradient_accumulation_steps=accumulation,
                             max_steps=steps, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
                             warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, seed=0, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0)


def _one_process(order: list[list[int]], steps: int, accumulation: int, replicas: int) -> dict[str, torch.Tensor]:
    """Plain SGD in one process: each optimizer step averages the token losses of its micro-batches
    (``accumulation`` per replica, ``replicas`` replicas) over all their labelled tokens."""
    model, data = tiny_model("llama", "eager"), _dataset()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    per_step = accumulation * replicas
    for step in range(steps):
        samples = [data[i] for replica in order for i in replica[step * accumulation:(step + 1) * accumulation]]
        assert len(samples) == per_step
        count = sum(int((s["labels"][1:] != -100).sum()) for s in samples)
        for s in samples:
            logits = model(input_ids=s["input_ids"][None], use_cache=False).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, s["labels"][1:], ignore_index=-100, reduction="sum")
            (loss / count).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _ring_trainer(rank: int, world: int, ring_size: int, accumulation: int, steps: int) -> dict:
    from torch.utils.data import DistributedSampler

    import ring_plugin.hf  # noqa: F401
    from ring_plugin.hf.trainer import RingTrainer

    with tempfile.TemporaryDirectory() as out:
        trainer = RingTrainer(model=tiny_model("llama", "ring"), args=_arguments(out, accumulation, steps),
                              train_dataset=_dataset(), eval_dataset=_dataset()[:4], ring_size=ring_size)
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
@pytest.mark.parametrize("world, ring_size, accumulation", [(2, 2, 1), (2, 2, 2), (4, 2, 1)])
def test_ring_trainer_equals_one_process(world, ring_size, accumulation):
    steps = 2
    results = run_in_process_group(_ring_trainer, world, ring_size, accumulation, steps, timeout=240)
    order = results[0]["order"]
    expected = _one_process(order, steps, accumulation, world // ring_size)
    for rank, result in enumerate(results):
        for name, ref in expected.items():
            assert rel_err(torch.from_numpy(result["weights"][name]), ref) <= 1e-5, (rank, name)
    moved = max(rel_err(expected[n], p.detach()) for n, p in tiny_model("llama", "eager").named_parameters())
    assert moved > 1e-3  # the steps changed the weights, so the comparison means something
    if world == ring_size:
        assert results[0]["eval_loss"] == pytest.approx(_eval_loss_one_process(expected), rel=1e-5)
