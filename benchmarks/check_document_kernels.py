"""One GPU: the varlen document kernels against the exact masked math kernel, block by block.

Run: ``python benchmarks/check_document_kernels.py`` (CUDA; writes a JSON under ``--out``).

The ring hands each block's (query rows, key rows, their document ids) to
:mod:`ring_plugin.ops.document_kernels`. This checks, on random ring-like blocks (documents cut at
both ends, documents present on one side only, grouped-query heads, batch 2, causal diagonal blocks
and full off-diagonal ones), that the CUDA varlen path gives the math kernel's output, logsumexp
and, fed a merged (out, lse) as in the ring, the same dQ/dK/dV. Then the layer at ring size 1 with
documents against the fp64 oracle, and its time against one raw varlen call at 128K tokens.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from provenance import write_json  # noqa: E402

from ring_plugin import create_ring_attention, reference_attention  # noqa: E402
from ring_plugin.attention.oracle import document_mask  # noqa: E402
from ring_plugin.ops.document_kernels import document_backward, document_forward  # noqa: E402
from ring_plugin.ops.kernels import band_backward, band_forward, math_backward, math_forward  # noqa: E402


def sorted_ids(n: int, first: int, docs: int, gen: torch.Generator) -> torch.Tensor:
    cuts = torch.sort(torch.randint(0, n, (docs,), generator=gen)).values
    return first + torch.searchsorted(cuts, torch.arange(n), right=True)


def block_case(causal: bool, seed: int, dev: torch.device):
    gen = torch.Generator().manual_seed(seed)
    b, h, hk, d, lq = 2, 8, 2, 128, 384
    lk = lq if causal else 256
    q_docs = torch.stack([sorted_ids(lq, 3, 6, gen) for _ in range(b)])
    # causal blocks: the same rows on both sides; full blocks: keys earlier, overlapping some documents
    k_docs = q_docs.clone() if causal else torch.stack([sorted_ids(lk, 1, 5, gen) for _ in range(b)])
    q = torch.randn(b, h, lq, d, generator=gen).to(dev, torch.bfloat16)
    k, v = (torch.randn(b, hk, lk, d, generator=gen).to(dev, torch.bfloat16) for _ in range(2))
    dout = torch.randn(b, h, lq, d, generator=gen).to(dev, torch.bfloat16)
    return q, k, v, dout, q_docs, k_docs


def compare_block(causal: bool, seed: int, dev: torch.device) -> dict:
    q, k, v, dout, qd, kd = block_case(causal, seed, dev)
    scale = q.shape[-1] ** -0.5
    out, lse = document_forward(q, k, v, qd, kd, causal, scale)
    allowed = (qd[:, :, None] == kd[:, None, :]).unsqueeze(1).to(dev)
    g = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    ref_out, ref_lse = math_forward(q, ke, ve, causal, scale, allowed)
    # backward fed a "merged" result: the block's own (out, lse) in fp32, as when it is the only block
    dq, dk, dv = document_backward(dout, q, k, v, ref_out.to(q.dtype), ref_lse, qd, kd, causal, scale)
    rq, rk, rv = math_backward(dout, q, ke, ve, ref_out.to(q.dtype), ref_lse, causal, scale, allowed)
    rk = rk.view(k.shape[0], k.shape[1], g, *k.shape[2:]).sum(2)
    rv = rv.view(v.shape[0], v.shape[1], g, *v.shape[2:]).sum(2)
    finite = torch.isfinite(ref_lse)

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))

    return {"causal": causal, "seed": seed, "out_rel": rel(out, ref_out),
            "lse_abs": float((lse[finite] - ref_lse[finite]).abs().max()),
            "empty_rows_match": bool(torch.equal(torch.isfinite(lse), finite)),
            "dq_rel": rel(dq, rq), "dk_rel": rel(dk, rk), "dv_rel": rel(dv, rv)}


def compare_band(left: int, right: int, dev: torch.device) -> dict:
    """The flash band kernel (a sliding window seen from a ring block) against the masked math kernel."""
    gen = torch.Generator().manual_seed(left + 7 * right)
    b, h, hk, d, n = 2, 8, 2, 128, 512
    q, dout = (torch.randn(b, h, n, d, generator=gen).to(dev, torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, hk, n, d, generator=gen).to(dev, torch.bfloat16) for _ in range(2))
    scale = d ** -0.5
    out, lse = band_forward(q, k, v, left, right, scale)
    i, j = torch.arange(n, device=dev)[:, None], torch.arange(n, device=dev)[None, :]
    allowed = (j >= i - left) & (j <= i + right)
    g = h // hk
    ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    ref_out, ref_lse = math_forward(q, ke, ve, False, scale, allowed)
    dq, dk, dv = band_backward(dout, q, k, v, ref_out.to(q.dtype), ref_lse, left, right, scale)
    rq, rk, rv = math_backward(dout, q, ke, ve, ref_out.to(q.dtype), ref_lse, False, scale, allowed)
    rk, rv = (t.view(b, hk, g, n, d).sum(2) for t in (rk, rv))
    finite = torch.isfinite(ref_lse)

    def rel(a, r):
        return float((a.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12))

    return {"left": left, "right": right, "out_rel": rel(out, ref_out),
            "lse_abs": float((lse[finite] - ref_lse[finite]).abs().max()),
            "dq_rel": rel(dq, rq), "dk_rel": rel(dk, rk), "dv_rel": rel(dv, rv)}


def layer_vs_oracle(dev: torch.device) -> dict:
    gen = torch.Generator().manual_seed(3)
    n, h, hk, d = 4096, 8, 2, 128
    ids = sorted_ids(n, 0, 9, gen)[None]
    q, g = (torch.randn(1, n, h, d, generator=gen).to(dev) for _ in range(2))
    k, v = (torch.randn(1, n, hk, d, generator=gen).to(dev) for _ in range(2))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = reference_attention(*ref, causal=True, allowed=document_mask(ids).to(dev))
    (ref_out * g.double()).sum().backward()
    low = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = create_ring_attention("standard")(*low, is_causal=True, document_ids=ids.to(dev))
    (out * g.to(torch.bfloat16)).sum().backward()
    errs = {}
    for name, mine, theirs in (("out", out, ref_out), *zip(("dq", "dk", "dv"), (t.grad for t in low),
                                                            (t.grad for t in ref))):
        errs[name + "_rel"] = float((mine.double() - theirs).abs().max() / theirs.abs().max())
    return errs


def timing(dev: torch.device, n: int) -> dict:
    gen = torch.Generator().manual_seed(4)
    h, d = 32, 128
    ids = sorted_ids(n, 0, 16, gen)[None]
    q, k, v, g = (torch.randn(1, n, h, d, generator=gen).to(dev, torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    attn = create_ring_attention("standard")
    _, counts = torch.unique_consecutive(ids[0], return_counts=True)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(dev, torch.int32)
    mx = int(counts.max())
    aten = torch.ops.aten
    rng = torch.zeros(2, dtype=torch.int64, device=dev)
    qp, kp, vp, gp = (t.detach()[0] for t in (q, k, v, g))

    def layer() -> None:
        attn(q, k, v, is_causal=True, document_ids=ids.to(dev)).backward(g)

    def raw() -> None:
        out, lse, *_ = aten._flash_attention_forward(qp, kp, vp, cu, cu, mx, mx, 0.0, True, False)
        aten._flash_attention_backward(gp, qp, kp, vp, out, lse, cu, cu, mx, mx, 0.0, True, rng,
                                       torch.empty(0, device=dev))

    res = {}
    for name, fn in (("layer", layer), ("one_varlen_call", raw)):
        for _ in range(2):
            fn()
        times = []
        for _ in range(5):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        res[name + "_seconds"] = sorted(times)[2]
    pairs = float(sum(int(c) * (int(c) + 1) // 2 for c in counts)) * h
    for name in ("layer", "one_varlen_call"):
        res[name + "_tflops"] = 3.5 * 4 * d * pairs / res[name + "_seconds"] / 1e12
    res["layer_vs_raw"] = res["one_varlen_call_seconds"] / res["layer_seconds"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--length", type=int, default=131072)
    args = ap.parse_args()
    dev = torch.device("cuda")
    blocks = [compare_block(c, s, dev) for c in (True, False) for s in range(4)]
    bands = [compare_band(left, right, dev) for left, right in ((99, 0), (0, 0), (300, 200), (50, 511), (611, 100))]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "blocks": blocks, "bands": bands,
              "layer_vs_oracle_4k": layer_vs_oracle(dev), "timing": timing(dev, args.length)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"check_document_kernels_1x{result['device'].split()[-1]}_{result['date']}.json"
    write_json(path, result, indent=1)
    worst = {k: max(b[k] for b in blocks) for k in ("out_rel", "lse_abs", "dq_rel", "dk_rel", "dv_rel")}
    print("blocks: worst", {k: f"{v:.2e}" for k, v in worst.items()},
          "empty rows match:", all(b["empty_rows_match"] for b in blocks))
    print("bands: worst", {k: f"{max(b[k] for b in bands):.2e}" for k in ("out_rel", "lse_abs", "dq_rel", "dk_rel",
                                                                         "dv_rel")})
    print("layer vs fp64 oracle (4K, bf16):", {k: f"{v:.2e}" for k, v in result["layer_vs_oracle_4k"].items()})
    t = result["timing"]
    print(f"timing at {args.length}: layer {t['layer_tflops']:.0f} TFLOP/s, one varlen call "
          f"{t['one_varlen_call_tflops']:.0f} TFLOP/s, ratio {t['layer_vs_raw']:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
