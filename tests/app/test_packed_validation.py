"""``ring-train data=packed`` trains and validates end to end in both layouts: the validation metrics see
the batch's documents (through its shard plan), and ``val/token_acc`` equals one process computing it on
the whole sequences with the trained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from ring_plugin.app.config_checks import model_kwargs
from ring_plugin.data.tasks import answer_accuracy
from ring_plugin.models import RingCausalLM
from tests import prefork

from .helpers import final_weights, read_csv_metrics, run_ring_train
from .test_config import compose_app

OVERRIDES = ("data=packed", "max_steps=20", "trainer.val_check_interval=20", "data.val_batches=1",
             "model.warmup_steps=2", "data.train.mean_doc_len=12", "model.vocab_size=64")


def _one_process_token_accuracy(weights: dict[str, torch.Tensor], documents: bool) -> float:
    """Token accuracy of the first validation batch, computed by one process on the whole sequences."""
    from .helpers import TINY

    cfg = compose_app(*TINY, *OVERRIDES)
    model = RingCausalLM(**model_kwargs(cfg)).model
    model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
    model.eval()
    batch = next(iter(instantiate(cfg.data).val_dataloader()))
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["position_ids"], batch["document_ids"] if documents else None)
    wrong, scored = answer_accuracy(logits, batch["labels"])
    return float((scored.sum() - wrong.sum()) / scored.sum())


@pytest.mark.parametrize("layout", ["zigzag", "balanced"])
def test_packed_run_validates_with_its_documents(tmp_path: Path, layout: str) -> None:
    out = tmp_path / "run"
    done = run_ring_train(out, *OVERRIDES, f"layout={layout}", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in read_csv_metrics(out) if r.get("val/token_acc")]
    assert [int(r["step"]) for r in rows] == [19], rows  # one validation, after the 20th step (0-based 19)
    logged = float(rows[0]["val/token_acc"])
    weights = final_weights(out / "checkpoints" / "step000020.ckpt")
    expected = _one_process_token_accuracy(weights, documents=True)
    assert expected > 0  # some tokens right: equality below is not that of two zeros
    assert logged == pytest.approx(expected, abs=1e-6)
    # The documents matter to this number: attending across them gives another accuracy.
    assert _one_process_token_accuracy(weights, documents=False) != pytest.approx(expected, abs=1e-6)


HF_OVERRIDES = ("model=hf", "data=packed", "logger=[csv]", "max_steps=12", "model.warmup_steps=1", "seq_len=64",
                "data.batch_size=2",
                "data.val_batches=1", "trainer.val_check_interval=12", "trainer.enable_progress_bar=false",
                "comm_timeout=30", "callbacks.checkpointing.every_n_train_steps=12", "data.train.mean_doc_len=12",
                "layout=balanced")


def test_hf_model_trains_and_validates_on_packed_data(tmp_path: Path) -> None:
    """``model=hf data=packed``: HFCausalLM passes the batch's documents to every layer, in training and in
    validation; the logged token accuracy is one process's on the whole sequences."""
    import subprocess

    from .helpers import REPO, env

    out = tmp_path / "run"
    cmd = [prefork.python(), "-m", "ring_plugin.app.train", f"hydra.run.dir={out}", *HF_OVERRIDES]
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in read_csv_metrics(out) if r.get("val/token_acc")]
    assert [int(r["step"]) for r in rows] == [11], rows
    cfg = compose_app(*HF_OVERRIDES)
    module = instantiate(cfg.model, max_steps=cfg.max_steps)
    module.configure_model()
    module.load_state_dict(final_weights(out / "checkpoints" / "step000012.ckpt"))
    module.eval()
    batch = next(iter(instantiate(cfg.data).val_dataloader()))
    with torch.no_grad():
        logits = module(batch["input_ids"], batch["position_ids"], batch["document_ids"])
    wrong, scored = answer_accuracy(logits, batch["labels"])
    expected = float((scored.sum() - wrong.sum()) / scored.sum())
    assert expected > 0  # some tokens right: equality below is not that of two zeros
    assert float(rows[0]["val/token_acc"]) == pytest.approx(expected, abs=1e-6)
