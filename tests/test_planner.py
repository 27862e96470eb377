"""The planner's analytic quantities against the real model and engine (CPU): parameter, gradient and
optimizer bytes (exact), activations saved for backward (saved_tensors_hooks), the ring's in-flight
buffers (dense_ring.py with a stand-in ring), and measured.json against the files it cites."""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from benchmarks.live_bytes import saved_bytes
from ring_plugin.attention import dense_ring
from ring_plugin.attention.call import RingCall
from ring_plugin.comm.ring import PendingExchange, RingComm
from ring_plugin.layout import ShardLayout
from ring_plugin.models.gpt import RingGPT
from ring_plugin.ops.kernels import select_kernel
from ring_plugin.planner import ModelSpec, state_bytes
from ring_plugin.planner.cluster import GPUS
from ring_plugin.planner.memory import (
    block_kept_per_token,
    checkpoint_saved_per_token,
    layer_saved_per_token,
    ring_buffers,
    ring_step_received,
    shared_saved_per_token,
)
from ring_plugin.planner.model_states import param_tensors
from ring_plugin.planner.rates import load_measured
from ring_plugin.planner.workload import CHECKPOINTING

REPO = Path(__file__).resolve().parents[1]
SMALL = yaml.safe_load((REPO / "ring_plugin/conf/model/gpt_small.yaml").read_text())
VARIANTS = {
    "gpt_small": {},
    "gqa_bias_layernorm_untied": dict(n_head=4, n_kv_head=2, bias=True, norm="layernorm", tie_weights=False,
                                      mlp_hidden=96, vocab_size=61),
}


def spec_of(**changes: object) -> ModelSpec:
    return ModelSpec.from_dict({**SMALL, "max_seq_len": 512, **changes})


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_state_bytes_equal_the_real_model(variant: str, world: int, zero: int) -> None:
    spec = spec_of(**VARIANTS[variant])
    model = RingGPT(spec.config)
    real = [(p.numel(), p.dim()) for p in model.parameters()]
    assert sorted(param_tensors(spec)) == sorted(real)
    full = sum(n for n, _ in real)
    per_tensor = sum(math.ceil(n / world) for n, _ in real)  # ZeRO-3: each tensor split, padded
    groups = [sum(n for n, d in real if d >= 2), sum(n for n, d in real if d < 2)]  # ZeRO-1/2: flat groups
    per_group = sum(math.ceil(g / world) for g in groups if g)
    split = per_tensor if zero == 3 else per_group
    got = state_bytes(spec, world, zero)
    assert got.params == 2 * (split if zero == 3 else full)
    assert got.grads == 2 * (split if zero >= 2 else full)
    assert got.optimizer == 12 * (split if zero >= 1 else full)


def saved_bytes_by_block(spec: ModelSpec, mode: str, n: int) -> dict[object, int]:
    """Unique storages (parameters excluded) packed for backward during a bf16 forward, by the block
    that first saved them ('embed' before the first block, 'final' for the final norm), with
    checkpointing ``mode`` "none", "full" or "selective" (recompute_attention=False)."""
    torch.manual_seed(0)
    config = spec.config
    config.activation_checkpointing, config.recompute_attention = CHECKPOINTING[mode]
    model = RingGPT(config).to(torch.bfloat16).train()
    where: list[object] = ["embed"]
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, i))
    model.norm_f.register_forward_pre_hook(lambda *_: where.__setitem__(0, "final"))
    ids = torch.randint(0, config.vocab_size, (1, n))
    _, found = saved_bytes(lambda: model.hidden_states(ids, torch.arange(n)[None]), label=lambda: where[0],
                           exclude={p.untyped_storage().data_ptr() for p in model.parameters()})
    return found


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", CHECKPOINTING)
def test_saved_activations_match_the_model(variant: str, mode: str) -> None:
    spec, n = spec_of(n_layer=3, **VARIANTS[variant]), 256
    found = saved_bytes_by_block(spec, mode, n)
    # CPU runs the composite RMSNorm (fp32 copies); CUDA's fused kernel is the planner's default.
    fused = spec.config.norm != "rmsnorm"
    per_layer = block_kept_per_token(spec, 2, fused, 1, mode)
    for block in (1, 2):  # block 0 also saves the shared cos/sin
        assert found[block] == pytest.approx(n * per_layer, rel=0.03)
    total = sum(found.values())
    assert total == pytest.approx(n * (spec.config.n_layer * per_layer + shared_saved_per_token(spec, 2, fused)),
                                  rel=0.03)
    if mode == "full":
        assert per_layer == checkpoint_saved_per_token(spec, 2)
    if mode == "none":
        assert per_layer == layer_saved_per_token(spec, 2, fused)


class StandInRing(RingComm):
    """A ring of ``world`` ranks in one process: every exchange 'receives' a copy of what was sent, so
    buffer lifetimes are the engine's own (numbers are not)."""

    def __init__(self, world: int):
        super().__init__(None)
        self.world_size = world
        self.received: list[weakref.ref] = []

    def exchange(self, tensors: list[torch.Tensor]) -> PendingExchange:
        recv = [t.clone() for t in tensors]
        self.received += [weakref.ref(r) for r in recv]
        return PendingExchange([], recv, self)

    def exchange_with(self, send, to, recv, frm) -> PendingExchange:  # the dK/dV messages home
        recv = [torch.zeros_like(r) for r in recv or []]
        self.received += [weakref.ref(r) for r in recv]
        return PendingExchange([], recv, self)

    def alive(self) -> int:
        return sum(r() is not None for r in self.received)


@pytest.mark.parametrize("ring", [2, 3, 4, 6])
def test_ring_in_flight_buffers_match_the_engine(ring: int, monkeypatch: pytest.MonkeyPatch) -> None:
    comm = StandInRing(ring)
    kernel = select_kernel("auto", torch.device("cpu"), torch.float32, 8)
    call = RingCall(comm, ShardLayout.named("zigzag", ring), kernel, 0.35, True, heads=4, kv_heads=2)
    peak = {"forward": 0, "backward": 0}

    def counting(phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            peak[phase] = max(peak[phase], comm.alive())
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(dense_ring, "forward_rows", counting("forward", dense_ring.forward_rows))
    monkeypatch.setattr(dense_ring, "backward_rows", counting("backward", dense_ring.backward_rows))
    q = torch.randn(1, 4, 8 * ring, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 8 * ring, 8, requires_grad=True) for _ in range(2))
    dense_ring.DenseRingAttention.apply(q, k, v, call).sum().backward()
    steps = range(1, ring)
    assert peak["forward"] == max(ring_step_received(ring, s, backward=False) for s in steps)
    assert peak["backward"] == max(ring_step_received(ring, s, backward=True) for s in steps)
    buffers = ring_buffers(ring)
    assert 2 * buffers.forward_kv == peak["forward"]
    # From ring 4 the next K/V pair and a dK/dV message are both in flight while a middle step computes.
    # At ring 3 they never coincide during a block, and at ring 2 the only message lands after the last
    # step (while the kernel's dK/dV it answers are alive): there the planner counts one pair more.
    pairs = buffers.backward_kv + buffers.backward_dkv
    assert 2 * pairs == peak["backward"] + 2 * (ring <= 3)


def _pick(data: object, path: list) -> object:
    for key in path:
        data = data[key]  # type: ignore[index]
    return data


def test_measured_json_copies_its_sources() -> None:
    measured = load_measured()
    checked = 0

    def walk(node: object) -> None:
        nonlocal checked
        if isinstance(node, dict):
            if "from" in node:
                source = json.loads((REPO / "benchmarks/results" / node["from"][0]).read_text())
                value = _pick(source, node["from"][1:])
                mine = next(node[k] for k in ("tflops", "value", "seconds", "bytes_per_s") if k in node)
                scale = 1e9 if str(node["from"][-1]).endswith("GBps") else 1.0  # GB/s in the results
                assert mine == pytest.approx(value * scale), node["from"]
                checked += 1
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(measured)
    assert checked > 20


def test_monitoring_counts_mfu_with_the_planners_peaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MFU the training run logs and the planner's use one peak per GPU kind."""
    pytest.importorskip("lightning")
    from ring_plugin.callbacks.monitoring import device_peak_flops

    for key, name in {"h200": "NVIDIA H200", "h100": "NVIDIA H100 80GB HBM3", "a100": "NVIDIA A100-SXM4-80GB"}.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert device_peak_flops(torch.device("cuda"), 1.0) == GPUS[key].peak_bf16_flops
    assert GPUS["h200"].peak_bf16_flops == 989e12 and GPUS["a100"].peak_bf16_flops == 312e12
