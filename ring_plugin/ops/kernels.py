"""Attention kernels that return a logsumexp, with matching backward calls.

Every kernel takes ``(batch, heads, length, head_dim)`` tensors (strided views with a unit-stride last
dim are fine: the pattern views are read in place) with the same head count,
and a causal flag that is only ever used on square blocks (query and key chunks at the same global
positions), so top-left and bottom-right causal alignment agree. The forward returns the output in
the input dtype (or fp32) and the logsumexp as fp32 ``(batch, heads, length)``; the backward
returns gradients in the input dtype (or fp32). The backward is fed the
*merged* output and logsumexp of the whole ring, which makes each block's gradient exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

aten = torch.ops.aten

# 'flex' is not a kernel of this module: it selects block-sparse attention's gathered path (one
# flex_attention call, :mod:`ring_plugin.attention.gathered`) and is valid for that variant only.
BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "cpu_flash", "flex")

ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]
BackwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Kernel:
    name: str
    forward: ForwardFn
    backward: BackwardFn
    fp32_partials: bool = False  # returns half-precision blocks' results in fp32 (see CPU flash)

    def grad_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the dQ/dK/dV its backward returns for inputs of ``dtype``."""
        return torch.float32 if self.fp32_partials and dtype in (torch.float16, torch.bfloat16) else dtype


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a known kernel backend; valid: {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------------------------------- math
def math_forward(q, k, v, causal, scale, allowed=None):
    """``allowed``: an optional bool mask broadcasting to the scores (B, H, Lq, Lk), e.g. documents."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    s = _masked(s, causal, allowed)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - _finite(lse).unsqueeze(-1))
    out = torch.matmul(p, v.to(compute))
    return out, lse.float()  # unrounded: the merge is in fp32


def math_backward(dout, q, k, v, out, lse, causal, scale, allowed=None):
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc, doc = (t.to(compute) for t in (q, k, v, dout))
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    s = _masked(s, causal, allowed)
    p = torch.exp(s - _finite(lse.to(compute)).unsqueeze(-1))
    dp = torch.matmul(doc, vc.transpose(-1, -2))
    delta = (doc * out.to(compute)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kc) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qc) * scale
    dv = torch.matmul(p.transpose(-1, -2), doc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _masked(s: torch.Tensor, causal: bool, allowed: torch.Tensor | None) -> torch.Tensor:
    if causal:
        s = s.masked_fill(_causal_mask(s), float("-inf"))
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def _causal_mask(s: torch.Tensor) -> torch.Tensor:
    lq, lk = s.shape[-2:]
    return torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu(1)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows with no key) replaced by 0 so that exp(s - lse) gives 0, not NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


# ----------------------------------------------------------------------------------------- CPU flash
# Half-precision blocks are computed in fp32 on CPU: a partial output rounded to bf16 carries an
# error relative to its own (larger) magnitude, which would make the ring's error grow with the
# ring size. fp32 partials keep the ring at least as accurate as one bf16 SDPA call.
def _cpu_flash_forward(q, k, v, causal, scale):
    q, k, v = (t.float() for t in (q, k, v))
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def _cpu_flash_backward(dout, q, k, v, out, lse, causal, scale):
    dout, q, k, v, out = (t.float() for t in (dout, q, k, v, out))
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


# ------------------------------------------------------------------------------------------- CUDA
def _cudnn_forward(q, k, v, causal, scale):
    res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return res[0], res[1].reshape(q.shape[:3])


def _cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    # cum_seq_q/k must be undefined (None): defined ones select cuDNN's nested (varlen) path.
    seed = torch.zeros((), device=q.device, dtype=torch.int64)
    dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1).contiguous(), seed, seed, None,
        None, None, q.shape[2], k.shape[2], 0.0, causal, scale=scale,
    )
    return dq, dk, dv


def _flash_forward(q, k, v, causal, scale):
    res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return res[0], res[1]


def _flash_backward(dout, q, k, v, out, lse, causal, scale):
    # Undefined cu_seqlens select the dense (not varlen) path; the RNG state is unused without dropout.
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal,
        None, None, scale=scale,
    )


def _efficient_forward(q, k, v, causal, scale):
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return out, lse[..., : q.shape[2]]


def _efficient_backward(dout, q, k, v, out, lse, causal, scale):
    seed = torch.zeros((), device=q.device, dtype=torch.int64)  # RNG state: unused without dropout
    pad = (-lse.shape[-1]) % 32
    lse_padded = torch.nn.functional.pad(lse, (0, pad)).contiguous()
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, lse_padded, seed, seed, 0.0, [True, True, True, False], causal, scale=scale
    )
    return dq, dk, dv


KERNELS: dict[str, Kernel] = {
    "math": Kernel("math", math_forward, math_backward),
    "cpu_flash": Kernel("cpu_flash", _cpu_flash_forward, _cpu_flash_backward, fp32_partials=True),
    "cudnn": Kernel("cudnn", _cudnn_forward, _cudnn_backward),
    "flash": Kernel("flash", _flash_forward, _flash_backward),
    "efficient": Kernel("efficient", _efficient_forward, _efficient_backward),
}

_CUDA_ONLY = ("cudnn", "flash", "efficient")


def _sdpa_flags_allow(name: str) -> bool:
    """Whether PyTorch's SDPA backend switches (``torch.nn.attention.sdpa_kernel``) allow ``name``."""
    flags = {
        "cudnn": torch.backends.cuda.cudnn_sdp_enabled,
        "flash": torch.backends.cuda.flash_sdp_enabled,
        "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
        "math": torch.backends.cuda.math_sdp_enabled,
    }
    return flags[name]()


def select_kernel(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                  follow_sdpa_flags: bool = False) -> Kernel:
    """Resolve a backend name to a kernel for this device, dtype and head size.

    ``auto`` picks the fastest kernel that supports the inputs: on CUDA cuDNN (half precision,
    head_dim <= 128), then flash (half, head_dim <= 256), then memory-efficient (fp32), then math; on CPU the CPU flash
    kernel (fp32/bf16/fp16), math for fp64. With ``follow_sdpa_flags`` the CUDA choice also honours
    the switches set by ``torch.nn.attention.sdpa_kernel``, as ``scaled_dot_product_attention`` does.
    """
    check_backend(backend)
    if backend == "flex":
        raise ValueError(
            "backend='flex' is not a ring-engine kernel: it is valid for block-sparse attention "
            "(variant 'block_sparse') only, which then runs one flex_attention call"
        )
    half = dtype in (torch.float16, torch.bfloat16)
    if backend == "auto":
        if device.type == "cuda":
            order = []
            if half and head_dim <= 128:
                order.append("cudnn")
            if half and head_dim <= 256:
                order.append("flash")
            if dtype == torch.float32:
                order.append("efficient")
            order.append("math")
            if follow_sdpa_flags:
                order = [name for name in order if _sdpa_flags_allow(name)] or ["math"]
            return KERNELS[order[0]]
        if dtype == torch.float64:
            return KERNELS["math"]
        return KERNELS["cpu_flash"]
    if backend in _CUDA_ONLY and device.type != "cuda":
        raise ValueError(f"backend={backend!r} needs CUDA tensors, got device {device}; use 'auto' or 'math'")
    if backend in ("cudnn", "flash") and not half:
        raise ValueError(f"backend={backend!r} supports float16/bfloat16 only, got {dtype}")
    if backend == "efficient" and dtype != torch.float32:
        # Measured on H200, torch 2.11: its backward fed a merged out/lse gives wrong dQ/dK in
        # half precision (dV is right), so the ring cannot use it there.
        raise ValueError(f"backend='efficient' is exact in the ring for float32 only, got {dtype}; "
                         "use 'cudnn' or 'flash' for half precision")
    if backend == "cpu_flash" and device.type != "cpu":
        raise ValueError(f"backend='cpu_flash' needs CPU tensors, got device {device}")
    return KERNELS[backend]


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# ------------------------------------------------------- masked blocks (documents, windows): shared
def takes_flash(q: torch.Tensor) -> bool:
    """Whether flash's own masks (varlen runs, windows) serve ``q``: CUDA half precision."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def expand_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """K/V ``(B, H_kv, L, D)`` repeated to ``heads`` query heads (grouped-query attention)."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def reduce_kv_heads(x: torch.Tensor, kv_heads: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum the gradients of query heads that share a K/V head (in ``dtype``, e.g. fp32)."""
    b, h, n, d = x.shape
    return x if h == kv_heads else x.view(b, kv_heads, h // kv_heads, n, d).sum(2, dtype=dtype)


def masked_forward(q, k, v, causal: bool, scale: float, allowed: torch.Tensor):
    """The exact math kernel under a boolean mask, ``k``/``v`` with any number of K/V heads."""
    heads = q.shape[1]
    return math_forward(q, expand_kv_heads(k, heads), expand_kv_heads(v, heads), causal, scale, allowed)


def masked_backward(dout, q, k, v, out, lse, causal: bool, scale: float, allowed: torch.Tensor):
    """Backward of :func:`masked_forward`; dK/dV come back with ``k``'s head count."""
    heads, kv_heads = q.shape[1], k.shape[1]
    dq, dk, dv = math_backward(dout, q, expand_kv_heads(k, heads), expand_kv_heads(v, heads), out, lse,
                               causal, scale, allowed)
    return dq, reduce_kv_heads(dk, kv_heads), reduce_kv_heads(dv, kv_heads)


# ------------------------------------------------------------------------------------ band (window)
# A sliding window seen from one ring block: local query i sees local keys i - left .. i + right
# (equal query and key lengths). Flash takes such a window natively; elsewhere the exact math kernel
# with the band as a mask.
def _band_mask(lq: int, lk: int, left: int, right: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return (j >= i - left) & (j <= i + right)


def band_forward(q, k, v, left: int, right: int, scale: float):
    """``(out, lse)`` of ``(B, H, L, D)`` tensors under the band; ``k``/``v`` may have fewer heads."""
    if takes_flash(q):
        out, lse, *_ = aten._flash_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, q.shape[2], k.shape[2], 0.0,
            False, False, scale=scale, window_size_left=left, window_size_right=right,
        )
        return out.transpose(1, 2), lse
    return masked_forward(q, k, v, False, scale, _band_mask(q.shape[2], k.shape[2], left, right, q.device))


def band_backward(dout, q, k, v, out, lse, left: int, right: int, scale: float):
    """``(dq, dk, dv)`` under the band, fed the merged ``out``/``lse`` (dk/dv with k's head count)."""
    if takes_flash(q):
        rng = torch.zeros(2, dtype=torch.int64, device=q.device)  # no dropout: the RNG state is unused
        dq, dk, dv = aten._flash_attention_backward(
            dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
            lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, False, rng, torch.empty(0, device=q.device),
            scale=scale, window_size_left=left, window_size_right=right,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    return masked_backward(dout, q, k, v, out, lse, False, scale,
                           _band_mask(q.shape[2], k.shape[2], left, right, q.device))
