"""A long-context job end to end on 2 processes: a jsonl of generated documents and a tiny BPE tokenizer in
(``data=hf``), a tiny Llama trained by ``ring-train``, a Hugging Face folder out (``outputs/<name>/hf`` and
``ring-export``) whose ``from_pretrained`` logits equal the checkpoint's module, the long-context evaluation
logged and drawn, a resume that continues at the exact sample, and one-line errors for bad data."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from ring_plugin.data.hf_text import HFTextDataModule
from ring_plugin.layout import shard_sequence
from tests import prefork

from ..hf_data_fixtures import documents, train_tokenizer, write_jsonl
from .helpers import REPO, env, read_csv_metrics, read_wandb_history

# The hf_job_cpu recipe's sizes.
SEQ, STEPS, BATCH, LENGTHS, DEPTHS = 256, 4, 2, (128, 256), (0.0, 0.5, 1.0)


def _cmd(root, vocab: int, out, steps: int, *extra: str) -> list[str]:
    """The CPU recipe (balanced layout, seq_len 256, long-context eval at 128 and 256 tokens), a step budget
    small enough for a test, and a recorder of the samples each step trains on."""
    return [prefork.python(), "-m", "ring_plugin.app.train", f"hydra.run.dir={out}", "recipe=hf_job_cpu",
            f"data.path={root / 'docs.jsonl'}", f"data.tokenizer={root / 'tok'}", f"data.cache_dir={root / 'cache'}",
            f"model.config.vocab_size={vocab}", "model.config.tie_word_embeddings=false", f"max_steps={steps}",
            "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
            "callbacks.checkpointing.every_n_train_steps=2", "comm_timeout=30", "logger=[csv,wandb]",
            "+callbacks.recorder._target_=tests.hf_data_fixtures.BatchRecorder",
            f"+callbacks.recorder.path={out / 'batches'}", *extra]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One ring-train run shared by the tests below (and the data module it trained on, from the cache)."""
    root = tmp_path_factory.mktemp("hf_job")
    write_jsonl(root / "docs.jsonl", [{"text": d} for d in documents(80, seed=11, max_words=30)])
    tokenizer = train_tokenizer(root / "tok")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    out = root / "run"
    run = subprocess.run(_cmd(root, vocab, out, STEPS), cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    data = HFTextDataModule(str(root / "docs.jsonl"), str(tokenizer), SEQ, val_fraction=0.1, num_proc=2,
                            cache_dir=str(root / "cache"), seed=1234, batch_size=BATCH)
    assert not data.tokenized_now  # the run's cache: same files, tokenizer, seq_len, packing and split
    return {"root": root, "vocab": vocab, "out": out, "data": data}


def _checkpoint_model(out):
    from transformers import AutoConfig, AutoModelForCausalLM

    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hf = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "hf"), attn_implementation="eager",
                                             dtype=torch.float32)
    model.load_state_dict(hf, strict=True)
    return model.eval()


def test_hf_folder_from_pretrained_gives_the_checkpoint_modules_logits(job):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = job["out"] / "hf"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names, names
    loaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    sample = job["data"].val_set[0]
    with torch.no_grad():
        want = _checkpoint_model(job["out"])(input_ids=sample["input_ids"][None]).logits
        got = loaded(input_ids=sample["input_ids"][None]).logits
    assert torch.equal(got, want)
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == job["data"].tokenizer.get_vocab()


def test_ring_export_writes_the_same_folder_from_the_checkpoint(job, tmp_path):
    from safetensors.torch import load_file

    cmd = [prefork.python(), "-m", "ring_plugin.hf.export", str(job["out"] / "checkpoints" / "last.ckpt"),
           str(tmp_path / "exported")]
    run = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got, want = (load_file(p / "model.safetensors") for p in (tmp_path / "exported", job["out"] / "hf"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "exported" / "tokenizer.json").read_text() == (job["out"] / "hf" / "tokenizer.json").read_text()
    # A checkpoint the run did not write (no manifest) is refused before anything is unpickled.
    stray = tmp_path / "stray.ckpt"
    stray.write_bytes((job["out"] / "checkpoints" / "last.ckpt").read_bytes())
    run = subprocess.run(cmd[:3] + [str(stray), str(tmp_path / "x")], cwd=REPO, env=env(), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "has no manifest" in run.stderr and not (tmp_path / "x").exists()


def test_long_context_eval_logs_the_answer_likelihood_of_the_trained_model(job):
    from transformers import AutoModelForCausalLM

    from ring_plugin.callbacks import LongContextEval

    rows = [r for r in read_csv_metrics(job["out"]) if r.get("long_context/acc")]
    assert len(rows) >= STEPS // 2, rows  # every validation (steps 2 and 4)
    final = rows[-1]
    evaluator = LongContextEval(list(LENGTHS), list(DEPTHS), str(job["out"]), seed=1234)
    model = AutoModelForCausalLM.from_pretrained(job["out"] / "hf", attn_implementation="eager",
                                                 dtype=torch.float32).eval()
    data = job["data"]
    for length in LENGTHS:
        for depth in DEPTHS:
            ids, labels = evaluator.probe(data.tokenizer, data.val_set.tokens, length, depth, 0)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids[None]).logits[0], -1)
            scored = labels != -100
            want = float(logp[scored].gather(-1, labels[scored][:, None]).sum())
            hit = float(bool((logp[scored].argmax(-1) == labels[scored]).all()))
            key = f"L{length}_d{depth:g}"
            assert math.isclose(float(final[f"long_context/logp/{key}"]), want, rel_tol=1e-4, abs_tol=1e-4), key
            assert float(final[f"long_context/acc/{key}"]) == hit
    assert sorted(p.name for p in (job["out"] / "long_context").glob("*.png"))[-1] == f"step{STEPS:06d}.png"
    assert any("long_context/acc" in row for row in read_wandb_history(job["out"]))


def _recorded(out) -> dict[int, list]:
    lines = (out / "batches" / "rank0.jsonl").read_text().splitlines()
    return {r["step"]: r["input_ids"] for r in map(json.loads, lines)}


def test_a_resume_continues_at_the_exact_sample(job):
    run = subprocess.run(_cmd(job["root"], job["vocab"], job["out"], STEPS + 2), cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming from" in run.stdout and "nothing to tokenize" in run.stdout + run.stderr
    seen = _recorded(job["out"])
    assert sorted(seen) == list(range(STEPS + 2))
    train = job["data"].train_set
    for step, ids in seen.items():  # one ring: step s trains samples s*BATCH .. s*BATCH+BATCH-1 (rank 0's shard)
        samples = [train[(step * BATCH + i) % len(train)] for i in range(BATCH)]
        full, docs = (torch.stack([s[k] for s in samples]) for k in ("input_ids", "document_ids"))
        assert ids == shard_sequence(full, 1, "balanced", 0, 2, docs).tolist(), step


@pytest.mark.parametrize("override, line", [
    ("data.text_field=body", "data.text_field='body' is not a field of path='{docs}'; its fields: text"),
    ("model.config.vocab_size=64", "model.config.vocab_size=64 is smaller than the {vocab} tokens of "
                                   "data.tokenizer='{tok}': set model.config.vocab_size={vocab}"),
])
def test_bad_data_is_a_one_line_config_error(job, tmp_path, override, line):
    run = subprocess.run(_cmd(job["root"], job["vocab"], tmp_path / "bad", 2, override), cwd=REPO,
                         env={**env(), "HYDRA_FULL_ERROR": "0"}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    want = line.format(docs=job["root"] / "docs.jsonl", vocab=job["vocab"], tok=job["root"] / "tok")
    assert run.stderr.strip().splitlines()[-1] == f"ring-train: config error: {want}"


@pytest.mark.timeout(400)
def test_zero3_run_gathers_the_same_weights_deepspeed_consolidates(job, tmp_path):
    """ZeRO-3: the folder written at the end (parameters gathered one at a time) equals ring-export's from the
    run's DeepSpeed checkpoint (DeepSpeed's zero_to_fp32), every tensor exactly and at its full shape."""
    from safetensors.torch import load_file

    out = tmp_path / "zero3"
    cmd = _cmd(job["root"], job["vocab"], out, 2, "strategy=deepspeed", "strategy.stage=3",
               "callbacks.long_context_eval=null", "comm_timeout=60")
    run = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=380)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "checkpoints" / "step000002.ckpt").is_dir()  # a DeepSpeed checkpoint folder
    export = [prefork.python(), "-m", "ring_plugin.hf.export", str(out / "checkpoints" / "last.ckpt"),
              str(tmp_path / "exported")]
    done = subprocess.run(export, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got, want = (load_file(p / "model.safetensors") for p in (out / "hf", tmp_path / "exported"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert got["model.embed_tokens.weight"].shape == (job["vocab"], 64)
