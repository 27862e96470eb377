"""Every Python block of the README runs as written, in one process and under ``torchrun`` with 2 processes,
and gives what it claims (each block is followed by a check against an oracle, run in the same process, which leaves a
``checked_<rank>`` file)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ring_plugin.testing import free_port

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
dense = StandardRingAttention()(q, k, v, is_causal=True)
oracle = RingDilatedAttentionCorrect(oracle_dtype="float64")(q.double(), k.double(), v.double(), is_causal=True)
torch.testing.assert_close(dense.double(), oracle, atol=1e-5, rtol=0)
open(f"checked_{dist.get_rank() if dist.is_initialized() else 0}", "w").write(f"{world}")
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
import math
assert trainer.global_step == 20 and math.isfinite(float(trainer.callback_metrics["train/loss"]))
open(f"checked_{trainer.global_rank}", "w").write(f"{world}")
""",
}


def _script(tmp_path: Path, key: str) -> Path:
    (block,) = [b for b in BLOCKS if key in b]
    path = tmp_path / "example.py"
    path.write_text(block + CHECKS[key])
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
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--rdzv-backend=static", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "--nnodes=1", "--node-rank=0", f"--nproc-per-node={processes}",
               str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # every rank ran its check to the end and saw the world it was started in
    checked = {p.name: p.read_text() for p in tmp_path.glob("checked_*")}
    assert checked == {f"checked_{r}": str(processes) for r in range(processes)}, proc.stdout[-3000:]
