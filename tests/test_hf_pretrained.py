"""One process: "ring" equals "eager"; a tiny model round-trips through save_pretrained / from_pretrained
(in a temporary folder, no network) and set_attn_implementation switches an existing model to the ring."""

from __future__ import annotations

import torch  # noqa: E402

from .hf_harness import rel_err, tiny_model, token_batch  # noqa: E402


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=torch.arange(batch["input_ids"].shape[1])[None],
                     use_cache=False).logits


def test_from_pretrained_with_ring_equals_eager(tmp_path):
    from transformers import AutoModelForCausalLM

    import ring_plugin.hf  # noqa: F401

    batch = token_batch(2, 24)
    eager = tiny_model("qwen2", "eager")
    eager.save_pretrained(tmp_path)
    ring = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ring", dtype=torch.float32)
    assert ring.config._attn_implementation == "ring"
    assert rel_err(_logits(ring, batch), _logits(eager, batch)) <= 1e-5


def test_set_attn_implementation_switches_to_the_ring(monkeypatch):
    import ring_plugin.hf.attention as attention

    batch = token_batch(1, 16)
    model = tiny_model("llama", "eager")
    ref = _logits(model, batch)
    model.set_attn_implementation("ring")
    calls = []
    engine = attention.ring_engine
    monkeypatch.setattr(attention, "ring_engine", lambda scaling: calls.append(scaling) or engine(scaling))
    got = _logits(model, batch)
    assert len(calls) == 2  # both layers ran on the ring engine
    assert rel_err(got, ref) <= 1e-5
