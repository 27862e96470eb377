"""Locality of Hilbert vs row-major order on a 2-D grid of tokens. Prints tables and writes JSON (``--out``).

- ``segments``: share of a token's 4-neighbours that fall in its own segment (dilated / Hilbert variant);
- ``block_sparse``: share of a token's 4-neighbours that fall in a block its block may attend to, under
  the block-sparse mask at ``--sparsity`` (the Hilbert block-sparse variant against plain block-sparse
  on row-major tokens).
"""

from __future__ import annotations

import argparse

import torch
from provenance import write_json  # noqa: E402

from ring_plugin.patterns import block_locality, block_mask, hilbert_permutation, segment_locality

GRIDS = [(64, 64), (256, 256), (192, 320), (100, 300)]
SEGMENTS = [256, 1024, 4096]
BLOCK_GRIDS = [(64, 64), (256, 256), (192, 320)]
BLOCK_SIZES = [16, 64, 256]
PATTERNS = ["local", "dilated_sparse", "global_local"]


def segment_rows() -> list[dict]:
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
    return rows


def block_sparse_rows(sparsity: float) -> list[dict]:
    rows = []
    print(f"\nblock-sparse at sparsity {sparsity}")
    print(f"{'grid':>10}{'block':>7}{'pattern':>16}{'row-major':>11}{'hilbert':>9}")
    for h, w in BLOCK_GRIDS:
        perm = hilbert_permutation(h, w)
        for bs in BLOCK_SIZES:
            for pattern in PATTERNS:
                mask = block_mask(h * w // bs, sparsity, pattern)
                rm = block_locality(torch.arange(h * w), h, w, bs, mask)
                hi = block_locality(perm, h, w, bs, mask)
                rows.append({"grid": [h, w], "block_size": bs, "pattern_type": pattern, "sparsity_ratio": sparsity,
                             "row_major": rm, "hilbert": hi})
                print(f"{f'{h}x{w}':>10}{bs:>7}{pattern:>16}{rm:>11.3f}{hi:>9.3f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/hilbert_locality.json")
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    report = {"segments": segment_rows(), "block_sparse": block_sparse_rows(args.sparsity)}
    write_json(args.out, report, indent=1)


if __name__ == "__main__":
    main()
