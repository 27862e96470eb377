"""HFCausalLM trains a transformers model on the ring under RingStrategy and RingDeepSpeedStrategy (ZeRO-3,
activation checkpointing) exactly like one process training the same model with "eager" attention on the
whole sequences: the same first-step gradients, the same loss at every step and, after 3 AdamW steps, the
same weights (CPU, gloo, ring of 2, zigzag); the same with offloaded checkpoints and MLP tiles."""

from __future__ import annotations

import pytest
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from ring_plugin.layout import gather_sequence  # noqa: E402
from ring_plugin.models import HFCausalLM  # noqa: E402
from ring_plugin.testing import run_in_process_group  # noqa: E402

from . import lightning_harness as H  # noqa: E402
from .hf_harness import rel_err, tiny_config  # noqa: E402

STEPS = 3
# The long-context switches (each layer's input on the host, MLPs in tiles of 5 of a rank's 16 tokens).
LONG = dict(offload_checkpoints=True, mlp_tile_tokens=5)
CASES = [H.Case("ddp", layout="zigzag"), H.Case("deepspeed", 3, layout="zigzag"),
         H.Case("ddp", layout="zigzag", model=dict(LONG)), H.Case("deepspeed", 3, layout="zigzag", model=dict(LONG))]


class StableAdamHFCausalLM(HFCausalLM):
    """HFCausalLM whose AdamW has eps=1e-3 (tests only). With the default 1e-8 an update is about
    lr * sign(grad) for gradient entries near 1e-8, so fp32 rounding of such an entry (1e-5 of the largest
    gradient is ~1e-8 here) flips updates of size lr; a larger eps bounds that amplification and lets the
    final weights be compared at the same 1e-5 as the gradients."""

    def configure_optimizers(self):
        config = super().configure_optimizers()
        for group in config["optimizer"].param_groups:
            group["eps"] = 1e-3
        return config


def make_module(pretrained: str | None = None, **switches: object) -> StableAdamHFCausalLM:
    # Tied embeddings, as in the Llama-3.2-1B recipe: under ZeRO-3 the head reads the embedding's partitioned weight.
    config = tiny_config("llama", tie_word_embeddings=True).to_dict()
    return StableAdamHFCausalLM(pretrained, config={**config, "model_type": "llama"}, lr=1e-2, weight_decay=0.1,
                                warmup_steps=1, max_steps=STEPS, loss_chunk_tokens=6, activation_checkpointing=True,
                                **switches)


def _full_weights(module) -> dict[str, torch.Tensor]:
    """Every parameter in full on every rank (gathered under ZeRO-3)."""
    params = dict(module.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: p.detach().clone() for n, p in params.items()}


class Recorder(Callback):
    """The initial and final weights, and the full (unsharded) batches the ring trained on."""

    def __init__(self, layout: str):
        self.layout, self.batches, self.start, self.end = layout, [], None, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = _full_weights(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        group = trainer.strategy.ring_groups.ring
        self.batches.append({k: gather_sequence(batch[k], 1, self.layout, group) for k in ("input_ids", "labels")})

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = _full_weights(pl_module)


def one_process_training(start: dict[str, torch.Tensor], batches: list[dict],
                         pretrained: str | None) -> tuple[dict, list[float], dict]:
    """The same model, optimizer and schedule in one process (eager attention, full logits, plain CE):
    final weights, the loss of every step, the first step's gradients."""
    from ring_plugin.comm.context import ring_context

    module = make_module(pretrained)
    module.configure_model()
    module.model.set_attn_implementation("eager")
    with torch.no_grad():  # by parameter: a tied head is one parameter under two names
        for name, p in module.named_parameters():
            p.copy_(start[name])
    optimizer = module.configure_optimizers()
    opt, sched = optimizer["optimizer"], optimizer["lr_scheduler"]["scheduler"]
    losses, grads = [], {}
    with ring_context(None, "contiguous"):
        for batch in batches:
            ids = batch["input_ids"]
            logits = module.model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
            loss.backward()
            losses.append(float(loss))
            grads = grads or {n: p.grad.clone() for n, p in module.named_parameters()}
            opt.step()
            sched.step()
            opt.zero_grad()
    return {n: p.detach() for n, p in module.named_parameters()}, losses, grads


def train_case(case: H.Case, rank: int, world: int, pretrained: str | None = None) -> dict[str, float] | None:
    from torch.utils.data import DataLoader

    recorder, capture = Recorder(case.layout), H.GradCapture()
    torch.manual_seed(0)
    samples = H.make_samples(STEPS, 32, seed=4)
    switches = {k: v for k, v in case.model.items() if k in LONG}
    H.make_trainer(case, world, STEPS, [recorder, capture]).fit(make_module(pretrained, **switches),
                                                                 DataLoader(samples, batch_size=1))
    if rank != 0:
        return None
    weights, losses, grads = one_process_training(recorder.start, recorder.batches, pretrained)
    if pretrained is not None:  # ZeRO-3 loaded the directory into the partitioned model as saved
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32).state_dict()
        loaded = {n.removeprefix("model."): p for n, p in recorder.start.items()}
        assert loaded.keys() <= saved.keys(), sorted(loaded.keys() - saved.keys())
        assert all(torch.equal(saved[n], p) for n, p in loaded.items()), "pretrained weights changed on loading"
    return {
        "steps": len(recorder.batches),
        "grads": max(rel_err(capture.grads[n], grads[n]) for n in grads),
        "losses": max(abs(a - b) / abs(b) for a, b in zip(capture.losses, losses, strict=True)),
        "weights": max(rel_err(recorder.end[n], weights[n]) for n in weights),
        "moved": max(rel_err(weights[n], recorder.start[n]) for n in weights),
    }


def world_worker(rank: int, world: int, pretrained: str) -> dict:
    out = {c.name: H.run_isolated(train_case, c, rank, world) for c in CASES}
    out["pretrained"] = H.run_isolated(train_case, CASES[-1], rank, world, pretrained)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    from .hf_harness import tiny_model

    pretrained = tmp_path_factory.mktemp("pretrained")
    tiny_model("llama", "eager", seed=7).save_pretrained(pretrained)
    return H.every_rank(run_in_process_group(world_worker, 2, str(pretrained), timeout=280, reuse=True))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [c.name for c in CASES] + ["pretrained"])
def test_three_steps_end_with_one_process_weights(results, name):
    """The ZeRO-3 run from a pretrained directory also starts from exactly its saved weights."""
    result = results[name]
    assert isinstance(result, dict), result
    assert result["steps"] == STEPS
    assert result["grads"] <= 1e-5 and result["losses"] <= 1e-5, result
    assert result["moved"] > 1e-3, result  # training changed the weights, so equality means something
    assert result["weights"] <= 1e-5, result
