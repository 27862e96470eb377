"""Attention-work balance of packed documents across a ring, per layout and ring size (CPU, seconds).

Seeded packed sequences (``packed_document_lengths``: log-normal lengths, mean 8K, sigma 1) are laid out
as ``balanced`` (equal chunks, ``balanced_chunks``), ``balanced_positions``, ``zigzag``, ``contiguous`` and
torch's per-document ``head_tail``. For each it counts the document-mask work (``mask_work``: the keys
each query row may attend to, the FLOPs the mask needs) and reports

* ``rank``: max / mean of the ranks' total work;
* ``step``: the lock-step ring time over the ideal, ``sum_s max_r M[r, r - s]`` / (total / ranks), where
  ``M[a, b]`` is the work of rank a's queries on rank b's keys (``ring_step_imbalance``);
* ``pairs_with_work``: the share of (query rank, key rank) pairs with any work (the rest can be skipped);
* ``max_pieces_per_rank``: runs of one document on one rank (varlen segments) on the most fragmented rank;
* for ``head_tail``, the padding torch would add (every document padded to a multiple of 2 x ranks).

    python benchmarks/packed_balance.py   # writes benchmarks/results/packed_balance.json, docs/packed_balance.png
"""

from __future__ import annotations

import argparse
import datetime
import math
from pathlib import Path

import torch
from packed_layouts import (
    TARGET_IMBALANCE,
    document_ids_from_lengths,
    imbalance,
    layout_owners,
    owner_rank_work,
    ring_step_imbalance,
    ring_step_work,
)
from provenance import write_json

from ring_plugin.documents import packed_document_lengths
from ring_plugin.documents.balance import CHUNKS_TARGET, MIN_CHUNK

LAYOUTS = ("balanced_positions", "balanced", "zigzag", "contiguous", "head_tail")
MASKS = {"causal": True, "bidirectional": False}


def _max_pieces(ids: torch.Tensor, owners: torch.Tensor, world_size: int) -> int:
    """Most runs of one document on one rank, over the ranks."""
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[1:] = (ids[1:] != ids[:-1]) | (owners[1:] != owners[:-1])
    return int(torch.bincount(owners[starts], minlength=world_size).max())


def measure(lengths: list[int], world_size: int, causal: bool) -> dict[str, dict[str, float]]:
    ids = document_ids_from_lengths(lengths)
    out: dict[str, dict[str, float]] = {}
    for layout in LAYOUTS:
        owners = layout_owners(ids, layout, world_size, causal)[0]
        steps = ring_step_work(ids, owners, world_size, causal)
        out[layout] = {
            "rank": imbalance(owner_rank_work(ids, owners, world_size, causal)),
            "step": ring_step_imbalance(steps),
            "pairs_with_work": float((steps > 0).double().mean()),
            "max_pieces_per_rank": _max_pieces(ids, owners, world_size),
        }
    pad = sum(math.ceil(n / (2 * world_size)) * 2 * world_size - n for n in lengths)
    out["head_tail"]["padding_fraction"] = pad / sum(lengths)
    return out


def _summary(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict]:
    summary = {}
    for layout in LAYOUTS:
        keys = runs[0][layout]
        summary[layout] = {f"{key}_{stat}": fn([r[layout][key] for r in runs])
                           for key in keys for stat, fn in (("max", max), ("mean", _mean))}
        for key in ("rank", "step"):
            summary[layout][f"{key}_per_seed"] = [r[layout][key] for r in runs]
    return summary


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-tokens", type=int, default=128 * 1024)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--rings", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--mean", type=float, default=8192.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--out", default="benchmarks/results/packed_balance.json")
    ap.add_argument("--plot", default="docs/packed_balance.png")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small tensors: threads only add overhead

    batches = [packed_document_lengths(args.n_tokens, seed, args.mean, args.sigma) for seed in range(args.seeds)]
    results = {mask: {str(w): _summary([measure(b, w, causal) for b in batches]) for w in args.rings}
               for mask, causal in MASKS.items()}
    report = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "work": "document-mask keys per query row (mask_work); rank = max / mean of rank totals; step = "
                "sum over ring steps of the busiest rank's work / (total / ranks)",
        "generator": {"function": "ring_plugin.documents.packed_document_lengths", "n_tokens": args.n_tokens,
                      "seeds": list(range(args.seeds)), "distribution": "log-normal", "mean": args.mean,
                      "sigma": args.sigma},
        "documents": {"per_sequence": [len(b) for b in batches], "longest": [max(b) for b in batches]},
        "balanced": {"target_imbalance": CHUNKS_TARGET, "min_chunk": MIN_CHUNK},
        "head_tail": "torch per-document split into 2k pieces, rank r takes pieces r and 2k-1-r; lengths not a "
                     "multiple of 2k split as tensor_split (first pieces one token longer); padding_fraction: "
                     "what torch would pad instead",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report, indent=1)
    _print_table(results, args.rings)
    if args.plot:
        _plot(results, args.rings, args.plot, args)


def _print_table(results: dict, rings: list[int]) -> None:
    for mask, per_ring in results.items():
        print(f"{mask}: per-rank / per-step imbalance (worst seed)")
        print(f"{'ring':>5}" + "".join(f"{layout:>20}" for layout in LAYOUTS))
        for world_size in rings:
            row = per_ring[str(world_size)]
            print(f"{world_size:>5}" + "".join(f"{row[lay]['rank_max']:>12.3f} / {row[lay]['step_max']:.3f}"
                                              for lay in LAYOUTS))


def _plot(results: dict, rings: list[int], path: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True, sharey=True)
    for col, (mask, per_ring) in enumerate(results.items()):
        for row, (key, what) in enumerate((("rank", "per rank"), ("step", "per ring step (lock-step time)"))):
            ax = axes[row][col]
            for layout in LAYOUTS:
                ax.plot(rings, [per_ring[str(w)][layout][f"{key}_max"] for w in rings], marker="o", label=layout)
            ax.axhline(TARGET_IMBALANCE, color="grey", linestyle="--", linewidth=1, label=f"{TARGET_IMBALANCE}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(rings, [str(w) for w in rings])
            ax.set_title(f"{mask} document mask: {what}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[1][col].set_xlabel("ring size")
    for row in axes:
        row[0].set_ylabel("work max / mean (worst seed)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Packed {args.n_tokens // 1024}K sequences, {args.seeds} seeds, log-normal documents "
                 f"(mean {args.mean:.0f}, sigma {args.sigma})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
