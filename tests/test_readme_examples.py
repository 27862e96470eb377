"""Every Python block of the README runs as written, in one process and under ``torchrun`` with 2 processes,
and gives what it claims (each block is followed by a check against an oracle, run in the same process, which leaves a
``checked_<rank>`` file)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from ring_plugin.testing import free_port
from tests import prefork

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)

CHECKS = {
    '"block_sparse", "hilbert", "auto"': """
import torch.nn.functional as F
ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q_full, k_full, v_full)), is_causal=True)
want = shard_sequence(ref.transpose(1, 2), dim=1, layout="zigzag", rank=rank, world_size=world)
torch.testing.assert_close(out_local, want, atol=1e-5, rtol=0)
open(f"checked_{rank}", "w").write(f"{world}")
""",
    "RingBlockSparseAttention(": """
assert out.shape == (2, 1024, 512)
assert (attn.get_communication_stats()["bytes_sent"] > 0) == (world > 1)  # the ring passed K/V around
from ring_plugin.comm.collectives import all_gather_sequence
from tests.pattern_world import oracle

# every variant call of the block (the prelude recorded them), on the whole sequence, against the oracle; the
# ranks share the oracles out (each compares whole outputs, its own rows and the other ranks')
assert [type(layer).__name__ for layer, *_ in RECORDED] == [
    "StandardRingAttention", "StandardRingAttention", "RingDilatedAttentionSDPA", "DistributedRingAttention",
    "RingDilatedAttentionCorrect", "RingBlockSparseAttention", "HilbertRingAttention", "StandardRingAttention"]
rank = dist.get_rank() if dist.is_initialized() else 0
for call, (layer, (q_, k_, v_), kwargs, got) in enumerate(RECORDED):
    ring = layer.resolve_ring()
    whole = [all_gather_sequence(t, 1, ring.layout, ring.group) for t in (q_, k_, v_, got)]
    if call % world != rank:
        continue
    want = oracle(layer, *(t.double() for t in whole[:3]), kwargs.get("is_causal", False))
    torch.testing.assert_close(whole[3].double(), want, atol=1e-5, rtol=0, msg=type(layer).__name__)
# The multihead layer: its projections of this rank's rows feed the ring (checked above against the oracle) and
# its output is out_proj of the ring's; in one process, all of it equals nn.MultiheadAttention with its weights
# (under torchrun each rank initialised its own weights, so there is no whole-sequence module to compare with).
import torch.nn.functional as F
_, projected, _, inner = RECORDED[-1]
for part, got in enumerate(projected):
    rows = slice(512 * part, 512 * (part + 1))
    want = F.linear(x, mha.in_proj_weight[rows], mha.in_proj_bias[rows]).view(2, 1024, 8, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
torch.testing.assert_close(out, mha.out_proj(inner.reshape(2, 1024, 512)), atol=1e-5, rtol=0)
if world == 1:
    torch_mha = torch.nn.MultiheadAttention(512, 8, batch_first=True)
    torch_mha.load_state_dict(mha.state_dict())
    mask = torch.nn.Transformer.generate_square_subsequent_mask(1024)
    torch.testing.assert_close(out, torch_mha(x, x, x, need_weights=False, attn_mask=mask, is_causal=True)[0],
                               atol=1e-5, rtol=0)
dense = StandardRingAttention()(q, k, v, is_causal=True)
oracle_out = RingDilatedAttentionCorrect(oracle_dtype="float64")(q.double(), k.double(), v.double(), is_causal=True)
torch.testing.assert_close(dense.double(), oracle_out, atol=1e-5, rtol=0)
open(f"checked_{rank}", "w").write(f"{world}")
""",
    "document_ids_from_position_ids(": """
import torch.nn.functional as F
parts, start = [], 0
for n in (700, 300, 24):  # the oracle: each document on its own
    doc = [t[:, start:start + n].transpose(1, 2) for t in (q_full, k_full, v_full)]
    parts.append(F.scaled_dot_product_attention(*doc, is_causal=True).transpose(1, 2))
    start += n
torch.testing.assert_close(out_local, shard(torch.cat(parts, 1)), atol=1e-5, rtol=0)
pos = torch.arange(1024)
band = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < 256)
ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q_full, k_full, v_full)), attn_mask=band)
torch.testing.assert_close(windowed, shard_sequence(ref.transpose(1, 2), 1, "zigzag", rank, world), atol=1e-5, rtol=0)
open(f"checked_{rank}", "w").write(f"{world}")
""",
    "ulysses_size=ulysses": """
import torch.nn.functional as F
ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q_full, k_full, v_full)), is_causal=True)
want = shard_sequence(ref.transpose(1, 2), dim=1, layout="zigzag", rank=rank, world_size=world)
torch.testing.assert_close(out_local, want, atol=1e-5, rtol=0)
assert attn.resolve_ring().ulysses_size == ulysses
open(f"checked_{rank}", "w").write(f"{world}")
""",
    "import ring_plugin.hf": """
torch.manual_seed(0)
ref = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
ref_loss = ref(**full_batch, use_cache=False).loss
ref_loss.backward()
total = loss.detach().clone()
if dist.is_initialized():
    dist.all_reduce(total)
torch.testing.assert_close(total, ref_loss.detach(), atol=1e-5, rtol=1e-5)
ref_grads = dict(ref.named_parameters())
for name, p in model.named_parameters():
    torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4)
rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
open(f"checked_{rank}", "w").write(f"{world}")
""",
    "RingCausalLM(": """
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ring_plugin.comm.context import ring_context

assert trainer.global_step == 20
# The trained model's validation loss through the ring equals one process's on the whole sequences.
samples = [PasskeyRetrieval(seq_len=256, vocab_size=64, seed=99)[i] for i in range(4)]
ring_loss = trainer.validate(model, DataLoader(samples, batch_size=2), verbose=False)[0]["val/loss"]
ids, labels = (torch.stack([s[key] for s in samples]) for key in ("input_ids", "labels"))
with torch.no_grad(), ring_context(None, "contiguous"):
    logits = model.model(ids, torch.arange(ids.shape[1]))
one_process = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
assert abs(ring_loss - float(one_process)) < 1e-5, (ring_loss, float(one_process))
assert float(one_process) < 3.0  # it learned: chance is ln 64 = 4.16
open(f"checked_{trainer.global_rank}", "w").write(f"{world}")
""",
}


# Run before a block: records every ring attention layer's outermost call (layer, q/k/v, keywords, output), so
# the check can compare calls whose results the block does not keep.
RECORD_CALLS = """
import torch as _torch
from ring_plugin import BaseRingAttention as _Base
RECORDED, _depth, _module_call = [], [0], _torch.nn.Module.__call__
def _recording_call(self, *args, **kwargs):
    if not isinstance(self, _Base) or _depth[0]:
        return _module_call(self, *args, **kwargs)
    _depth[0] += 1
    try:
        out = _module_call(self, *args, **kwargs)
    finally:
        _depth[0] -= 1
    RECORDED.append((self, args, kwargs, out.detach()))
    return out
_torch.nn.Module.__call__ = _recording_call
"""
PRELUDES = {"RingBlockSparseAttention(": RECORD_CALLS}


# After the check: end the process group, as torch asks of every distributed script (a gloo rank that exits
# with its group alive can abort in gloo's threads when its peer has already gone).
EPILOGUE = """
import torch.distributed as _dist
if _dist.is_initialized():
    _dist.barrier()
    _dist.destroy_process_group()
"""


def _script(tmp_path: Path, key: str) -> Path:
    (block,) = [b for b in BLOCKS if key in b]
    path = tmp_path / "example.py"
    path.write_text(PRELUDES.get(key, "") + block + CHECKS[key] + EPILOGUE)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_every_python_block_has_a_check() -> None:
    assert len(BLOCKS) == len(CHECKS)
    assert all(sum(key in b for b in BLOCKS) == 1 for key in CHECKS)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("key", list(CHECKS))
@pytest.mark.parametrize("processes", [1, 2])
def test_readme_block_runs_as_written(tmp_path: Path, key: str, processes: int) -> None:
    script = _script(tmp_path, key)
    if processes == 1:
        cmd = [prefork.python(), str(script)]
    else:
        cmd = [prefork.python(), "-m", "torch.distributed.run", "--rdzv-backend=static", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "--nnodes=1", "--node-rank=0", f"--nproc-per-node={processes}",
               str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # every rank ran its check to the end and saw the world it was started in
    checked = {p.name: p.read_text() for p in tmp_path.glob("checked_*")}
    assert checked == {f"checked_{r}": str(processes) for r in range(processes)}, proc.stdout[-3000:]
