"""Collectives one training step of a 4-layer HF Llama issues on 2 gloo ranks with packed documents.

Counts every call into ``torch.distributed`` (all-gathers, all-reduces, all-to-alls and the ring's batched
point-to-point exchanges) during ``model(**hf.shard_batch(batch)).loss.backward()`` and
``hf.reduce_gradients``, and how many of the all-gathers carried the document ids (int64 tensors shaped like
this rank's ids). Runs on any tree of the project (it uses only the public API), so the same command
measures two commits:

    PYTHONPATH=<tree> python benchmarks/count_collectives.py --layout zigzag
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # PYTHONPATH picks the tree measured
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from provenance import write_json  # noqa: E402

COUNTED = ("all_gather", "all_gather_into_tensor", "all_reduce", "all_to_all_single", "broadcast",
           "batch_isend_irecv", "barrier")
LENGTHS = (11, 5, 16, 9, 23)  # documents cut across chunks and ranks; 64 tokens
LAYERS = 4


def count_step(rank: int, world: int, layout: str) -> dict[str, object]:
    """This rank's collectives of one forward + backward + gradient reduction (after a warm-up step, so
    one-time group creation and agreements are not counted)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import ring_plugin.hf as hf
    from ring_plugin import ring_context

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         use_cache=False, attn_implementation="ring")
    model = LlamaForCausalLM(config)
    n = sum(LENGTHS)
    ids = torch.randint(0, 61, (1, n), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone(),
             "position_ids": torch.cat([torch.arange(length) for length in LENGTHS])[None]}
    calls: Counter[str] = Counter()
    id_gathers = [0]
    originals = {name: getattr(dist, name) for name in COUNTED}

    def counting(name: str):
        def call(*args, **kwargs):
            calls[name] += 1
            if name == "all_gather" and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.int64 \
                    and tuple(args[1].shape) == (1, n // world):
                id_gathers[0] += 1
            return originals[name](*args, **kwargs)
        return call

    with ring_context(dist.group.WORLD, layout):
        for step in range(2):
            if step == 1:
                for name in COUNTED:
                    setattr(dist, name, counting(name))
            try:
                model.zero_grad()
                model(**hf.shard_batch(batch), use_cache=False).loss.backward()
                hf.reduce_gradients(model)
            finally:
                for name, fn in originals.items():
                    setattr(dist, name, fn)
    return {"calls": dict(sorted(calls.items())), "total": sum(calls.values()), "id_all_gathers": id_gathers[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag", "balanced"])
    parser.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    args = parser.parse_args()
    from ring_plugin.testing import run_in_process_group

    per_rank = run_in_process_group(count_step, 2, args.layout, timeout=300)
    record = {"benchmark": "count_collectives", "layers": LAYERS, "layout": args.layout, "world": 2,
              "torch": torch.__version__, "per_rank": per_rank}
    print(json.dumps(record, indent=1))
    if args.out is not None:
        write_json(args.out, record, indent=1)


if __name__ == "__main__":
    main()
