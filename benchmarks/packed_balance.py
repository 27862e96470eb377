"""Attention work balance of packed documents across a ring: balanced vs zigzag vs contiguous vs torch head-tail.

For seeded packed sequences (``packed_document_lengths``: log-normal lengths, mean 8K, sigma 1) it counts
the document-mask work of every rank (``mask_work``: the keys each query row may attend to, the FLOPs the
mask needs) and reports max / mean per layout and ring size. Also: how many document pieces (varlen
segments) the most fragmented rank holds (and so its mean piece length), and how much padding torch's
per-document head-tail split would need (every document padded to a multiple of 2 x ring size). CPU
only, a few seconds.

    python benchmarks/packed_balance.py   # writes benchmarks/results/packed_balance.json, docs/packed_balance.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

import torch

from ring_plugin.balance import (
    MIN_CHUNK,
    TARGET_IMBALANCE,
    balanced_chunks,
    document_ids_from_lengths,
    head_tail_rank_work,
    imbalance,
    layout_chunks,
    packed_document_lengths,
    rank_work,
)

LAYOUTS = ("balanced", "zigzag", "contiguous", "head_tail")


def _chunk_segments(ids: torch.Tensor, chunks: tuple[tuple[int, ...], ...]) -> int:
    """Most document pieces on one rank: the distinct documents of each of its chunks, summed (a document
    running across two adjacent chunks of one rank counts twice: an upper bound on the kernel's segments)."""
    pieces = ids.view(sum(map(len, chunks)), -1)
    return max(sum(len(torch.unique(pieces[i])) for i in r) for r in chunks)


def _head_tail_segments(lengths: list[int], world_size: int) -> int:
    """Most document pieces on one rank under head-tail: pieces r and 2k-1-r of every document, if not empty."""
    pieces = 2 * world_size
    counts = [0] * world_size
    for length in lengths:
        sizes = [len(p) for p in torch.arange(length).tensor_split(pieces)]
        for r in range(world_size):
            counts[r] += (sizes[r] > 0) + (sizes[pieces - 1 - r] > 0)
    return max(counts)


def measure(lengths: list[int], world_size: int, causal: bool) -> dict[str, dict[str, float]]:
    ids = document_ids_from_lengths(lengths)
    out: dict[str, dict[str, float]] = {}
    for layout in LAYOUTS:
        if layout == "head_tail":
            work = head_tail_rank_work(ids, world_size, causal)
            segments = _head_tail_segments(lengths, world_size)
        else:
            if layout == "balanced":
                chunks = balanced_chunks(ids, world_size, causal)
            else:
                chunks = layout_chunks(layout, world_size)
            work = rank_work(ids, chunks, causal)
            segments = _chunk_segments(ids, chunks)
        out[layout] = {"imbalance": imbalance(work), "max_segments_per_rank": segments,
                       "tokens_per_segment": len(ids) / world_size / segments}
        if layout == "balanced":
            out[layout]["chunks_per_rank"] = len(chunks[0])
    pad = sum(math.ceil(n / (2 * world_size)) * 2 * world_size - n for n in lengths)
    out["head_tail"]["padding_fraction"] = pad / sum(lengths)
    return out


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
    results: dict[str, dict] = {}
    for mask in ("causal", "bidirectional"):
        per_ring = {}
        for world_size in args.rings:
            runs = [measure(lengths, world_size, mask == "causal") for lengths in batches]
            summary = {}
            for layout in LAYOUTS:
                keys = runs[0][layout].keys()
                summary[layout] = {f"{key}_{stat}": fn([r[layout][key] for r in runs])
                                   for key in keys for stat, fn in (("max", max), ("min", min), ("mean", _mean))}
                summary[layout]["imbalance_per_seed"] = [r[layout]["imbalance"] for r in runs]
            per_ring[str(world_size)] = summary
        results[mask] = per_ring

    report = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "work": "document-mask keys per query row (mask_work), summed per rank; imbalance = max / mean over ranks",
        "generator": {"function": "ring_plugin.balance.packed_document_lengths", "n_tokens": args.n_tokens,
                      "seeds": list(range(args.seeds)), "distribution": "log-normal", "mean": args.mean,
                      "sigma": args.sigma},
        "documents": {"per_sequence": [len(b) for b in batches], "longest": [max(b) for b in batches]},
        "balanced": {"target_imbalance": TARGET_IMBALANCE, "min_chunk": MIN_CHUNK},
        "head_tail": "torch per-document split into 2k pieces, rank r takes pieces r and 2k-1-r; lengths not a "
                     "multiple of 2k split as tensor_split (first pieces one token longer), padding_fraction: "
                     "what torch would pad instead",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    _print_table(results, args.rings)
    if args.plot:
        _plot(results, args.rings, args.plot, args)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _print_table(results: dict, rings: list[int]) -> None:
    for mask, per_ring in results.items():
        print(f"{mask}: imbalance max/mean per rank (worst seed / mean over seeds)")
        print(f"{'ring':>5}" + "".join(f"{layout:>22}" for layout in LAYOUTS))
        for world_size in rings:
            row = per_ring[str(world_size)]
            cells = "".join(f"{row[lay]['imbalance_max']:>13.3f} / {row[lay]['imbalance_mean']:.3f}" for lay in LAYOUTS)
            print(f"{world_size:>5}{cells}")


def _plot(results: dict, rings: list[int], path: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (mask, per_ring) in zip(axes, results.items()):
        for layout in LAYOUTS:
            worst = [per_ring[str(w)][layout]["imbalance_max"] for w in rings]
            ax.plot(rings, worst, marker="o", label=layout)
        ax.axhline(TARGET_IMBALANCE, color="grey", linestyle="--", linewidth=1, label=f"target {TARGET_IMBALANCE}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(rings, [str(w) for w in rings])
        ax.set_xlabel("ring size")
        ax.set_title(f"{mask} document mask")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attention work max / mean (worst seed)")
    axes[0].legend()
    fig.suptitle(f"Packed {args.n_tokens // 1024}K sequences, {args.seeds} seeds, log-normal documents "
                 f"(mean {args.mean:.0f}, sigma {args.sigma})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
