"""Locality of segments in Hilbert vs row-major order: the share of a token's 4-neighbours on the
grid that fall in its own segment. Prints a table and writes JSON (``--out``)."""

from __future__ import annotations

import argparse
import json

import torch

from ring_plugin.patterns import hilbert_permutation, segment_locality

GRIDS = [(64, 64), (256, 256), (192, 320), (100, 300)]
SEGMENTS = [256, 1024, 4096]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/hilbert_locality.json")
    args = ap.parse_args()
    rows = []
    print(f"{'grid':>10}{'segment':>9}{'row-major':>11}{'hilbert':>9}")
    for h, w in GRIDS:
        perm = hilbert_permutation(h, w)
        for seg in SEGMENTS:
            if seg > h * w or (h * w) % seg:
                continue
            rm = segment_locality(torch.arange(h * w), h, w, seg)
            hi = segment_locality(perm, h, w, seg)
            rows.append({"grid": [h, w], "segment": seg, "row_major": rm, "hilbert": hi})
            print(f"{f'{h}x{w}':>10}{seg:>9}{rm:>11.3f}{hi:>9.3f}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
