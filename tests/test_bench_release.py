"""``benchmarks/gpu_lightning.release``: after a DeepSpeed fit, what the engine owned is freed, so the next
benchmark row in the same process does not count it in its peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from tests import prefork
from tests.bench_smoke import REPO

SCRIPT = textwrap.dedent("""
    import gc, json, sys
    from types import SimpleNamespace
    import torch, torch.distributed as dist
    sys.path.insert(0, "benchmarks")
    import bench_train
    import gpu_lightning

    def live_bytes():
        gc.collect()
        storages = {}
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and not o.is_meta:
                storages[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
        return sum(storages.values())

    dist.init_process_group("gloo")
    if sys.argv[1] == "off":
        gpu_lightning.release = bench_train.release = lambda trainer: gpu_lightning.free_memory()
    bench_train.MODELS["smoke"] = lambda: dict(vocab_size=4096, n_layer=2, n_head=4, n_embd=256,
                                               activation_checkpointing=True)
    args = SimpleNamespace(seq_len=64, steps=2, warmup=1, precision="32-true", snapshot_step=None,
                           peak_tflops=989.0)
    before = live_bytes()
    bench_train.train("ring", "smoke", args, 1, 0, torch.device("cpu"))
    print(json.dumps({"left": live_bytes() - before}))
""")


def _left_after_fit(tmp_path, mode: str) -> int:
    script = tmp_path / "fit_once.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    proc = subprocess.run([prefork.python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(script), mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["left"]


@pytest.mark.timeout(300)
def test_release_frees_the_engines_states(tmp_path):
    # 1.1M parameters: fp32 weights, grads and Adam states are ~18 MB, DeepSpeed's gradient bucket 800 MB.
    kept = _left_after_fit(tmp_path, "off")
    left = _left_after_fit(tmp_path, "on")
    assert kept > 500e6, kept  # without release the finished engine still holds its bucket and states
    assert left < 40e6, left
