"""Does ``data=hf`` keep one GPU fed? Training tokens/s on real packed text against the same training on
random tokens (the pipeline costing nothing), and the data pipeline's own throughput beside the step time.

Run on one GPU. The data module needs ``datasets`` and its dependencies; where they are missing, make the
wheels where pip can reach PyPI and install them with ``pip install --no-index --no-deps wheels/*.whl``::

    pip wheel --no-deps -w wheels datasets==5.2.0 pyarrow==26.0.1 dill==0.4.1 multiprocess==0.70.19 \
        xxhash==4.1.0 fsspec==2026.9.0 pandas==3.1.1
    python benchmarks/bench_hf_data.py --out benchmarks/results

1. A corpus: ``--data FILE`` (a jsonl/parquet/txt the ``datasets`` library reads) or generated documents of
   words with log-normal lengths (``--corpus-tokens`` in all), and ``--tokenizer FOLDER`` or a byte-level BPE
   trained on the corpus with ``tokenizers``.
2. ``HFTextDataModule`` tokenizes (``--num-proc`` processes) and packs it (bfd, ``--seq-len``): the one-time
   cost is reported, and the pipeline alone: samples/s of its DataLoader (``--workers``, pinned memory).
3. A Llama-3.2-1B-shaped model (16 layers, 2048 wide, 32/8 heads, SwiGLU 8192; the vocabulary is the
   tokenizer's) with ``attn_implementation="ring"`` (one process: the engine's document masks), bf16,
   activation checkpointing, chunked cross-entropy, fused AdamW; each step makes its shard plan once, as the
   trainer does. ``--steps`` timed steps (after ``--warmup``) on (a) the DataLoader's batches, copied to the
   GPU each step, and (b) as many other real samples drawn beforehand, already on the GPU, their tokens
   replaced by random ones (the same kind of documents: the attention's work is alike, the pipeline costs
   nothing). Ratio = (a) / (b); target >= 0.97. The two runs alternate in rounds so drift hits both alike.

Writes ``bench_hf_data_<tag>_<date>.json`` into ``--out``. ``--smoke`` is a tiny CPU version (seconds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from provenance import write_json  # noqa: E402

from ring_plugin.data.hf_text import HFTextDataModule  # noqa: E402
from ring_plugin.models.loss import linear_cross_entropy_sum  # noqa: E402
from ring_plugin.shard_plan import SHARDS_KEY, sequence_shards  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be "
         "river stone cloud city light water north winter history theory number system people music").split()
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, tie_word_embeddings=True)


def write_corpus(path: Path, tokens: int, seed: int) -> Path:
    """Documents of random words (about one token per word), log-normal lengths around 4K words."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    left = tokens
    with open(path, "w") as f:
        while left > 0:
            n = int(min(left, max(16, rng.lognormal(np.log(4096), 1.0))))
            f.write(json.dumps({"text": " ".join(words[rng.integers(0, len(words), n)])}) + "\n")
            left -= n
    return path


def train_tokenizer(corpus: Path, folder: Path, vocab_size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(corpus) as f:
        tok.train_from_iterator((json.loads(line)["text"] for _, line in zip(range(2000), f)), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>").save_pretrained(folder)
    return folder


def build_model(vocab: int, shape: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    import ring_plugin.hf  # noqa: F401 - registers "ring"

    config = AutoConfig.for_model("llama", vocab_size=vocab, max_position_embeddings=1 << 20, use_cache=False,
                                  **shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="ring", dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    plan = sequence_shards(batch["document_ids"])  # once per step, where the trainer cuts its batch
    hidden = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                 document_ids=batch["document_ids"], use_cache=False,
                                 **{SHARDS_KEY: plan}).last_hidden_state
    labels = batch["labels"]
    loss = linear_cross_entropy_sum(hidden, model.get_output_embeddings().weight, labels, 4096)
    (loss / (labels != -100).sum().clamp_min(1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(model, optimizer, batches, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` training steps on ``batches`` (an iterator of CPU or device batches)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        train_step(model, optimizer, batch)
    sync(device)
    return time.perf_counter() - start


def document_count(batch: dict[str, torch.Tensor]) -> int:
    """Documents in a one-sample batch (their ids count from 0)."""
    return int(batch["document_ids"].max()) + 1


def counted(batches, documents: dict[str, int], key: str):
    """``batches`` passed through, their documents added to ``documents[key]``."""
    for batch in batches:
        documents[key] += document_count(batch)
        yield batch


def pipeline_rate(loader_iter, samples: int) -> float:
    start = time.perf_counter()
    for _ in range(samples):
        next(loader_iter)
    return samples / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--data", default=None, help="a corpus file the datasets library reads (default: generated)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: a BPE trained on the corpus)")
    p.add_argument("--corpus-tokens", type=int, default=40_000_000)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--num-proc", type=int, default=16)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default="/tmp/bench_hf_data")
    p.add_argument("--tag", default="gpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    args = p.parse_args()
    if args.smoke:
        args.corpus_tokens, args.vocab, args.seq_len, args.num_proc, args.workers = 60_000, 300, 512, 2, 1
        args.steps, args.warmup, args.rounds, args.tag = 2, 1, 1, "smoke"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.data) if args.data else write_corpus(work / f"corpus_{args.corpus_tokens}.jsonl",
                                                            args.corpus_tokens, 0)
    tokenizer = args.tokenizer or str(train_tokenizer(corpus, work / f"tokenizer_{args.vocab}", args.vocab))

    start = time.perf_counter()
    data = HFTextDataModule(str(corpus), tokenizer, args.seq_len, val_fraction=0.0, num_proc=args.num_proc,
                            cache_dir=str(work / "cache"), num_workers=args.workers, seed=0)
    prepare_s = time.perf_counter() - start
    train = data.train_set
    loader = torch.utils.data.DataLoader(train, batch_size=1, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                                         sampler=torch.utils.data.RandomSampler(train, replacement=True,
                                                                                num_samples=1 << 30))
    real = iter(loader)
    rate = pipeline_rate(real, max(4, 2 * args.warmup))  # the workers' start-up included once, then steady
    rate = pipeline_rate(real, max(8, args.steps))

    model = build_model(len(data.tokenizer), TINY if args.smoke else LLAMA_1B, device, dtype)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)
    gen = torch.Generator().manual_seed(0)
    vocab = len(data.tokenizer)

    def random_tokens(steps: int) -> list[dict[str, torch.Tensor]]:
        """``steps`` real samples moved to the device with random tokens (labels keep their ignored places)."""
        out = []
        for batch in (next(real) for _ in range(steps)):
            ids = torch.randint(0, vocab, batch["input_ids"].shape, generator=gen)
            labels = torch.where(batch["labels"] == -100, -100, torch.randint(0, vocab, ids.shape, generator=gen))
            out.append({**batch, "input_ids": ids, "labels": labels})
        return [{k: v.to(device) for k, v in b.items()} for b in out]

    timed_steps(model, optimizer, iter(random_tokens(args.warmup)), args.warmup, device)
    timed_steps(model, optimizer, real, args.warmup, device)
    times = {"real": 0.0, "random": 0.0}
    documents = {"real": 0, "random": 0}
    for _ in range(args.rounds):
        drawn = random_tokens(args.steps)
        documents["random"] += sum(map(document_count, drawn))
        times["random"] += timed_steps(model, optimizer, iter(drawn), args.steps, device)
        seen = counted(real, documents, "real")
        times["real"] += timed_steps(model, optimizer, seen, args.steps, device)
    tokens = args.rounds * args.steps * args.seq_len
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "seq_len": args.seq_len, "samples": len(train), "vocab": len(data.tokenizer),
        "model": "tiny" if args.smoke else "llama-3.2-1b shape", "dtype": str(dtype),
        "corpus": str(corpus), "prepare_s (tokenize + pack, once)": round(prepare_s, 2),
        "pipeline_tokens_per_s (loader alone)": round(rate * args.seq_len, 1),
        "step_s real": round(times["real"] / (tokens / args.seq_len), 4),
        "step_s random": round(times["random"] / (tokens / args.seq_len), 4),
        "tokens_per_s real": round(tokens / times["real"], 1),
        "tokens_per_s random": round(tokens / times["random"], 1),
        "ratio real/random": round(times["random"] / times["real"], 4),
        "documents per sample real": round(documents["real"] / (tokens / args.seq_len), 2),
        "documents per sample random": round(documents["random"] / (tokens / args.seq_len), 2),
        "pipeline / model tokens per s": round(rate * args.seq_len / (tokens / times["random"]), 2),
        "target": ">= 0.97",
        "command": " ".join(sys.argv),
    }
    path = write_json(Path(args.out) / f"bench_hf_data_{args.tag}_{dt.date.today().isoformat()}.json", result,
                      indent=1)
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
