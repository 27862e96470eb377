"""attn_implementation="ring": HF models on rings of 2 and 4 equal one process running "eager" on the whole
sequence (logits, loss, every gradient), and every refusal is raised on every rank without a hang."""

from __future__ import annotations

import pytest
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ring_plugin.comm.context import ring_context  # noqa: E402
from ring_plugin.comm.topology import SequenceMesh  # noqa: E402
from ring_plugin.layout import shard_sequence  # noqa: E402
from ring_plugin.testing import run_in_process_group  # noqa: E402

from .hf_harness import rel_err, tiny_model, token_batch  # noqa: E402

# mistral: a sliding window (64) longer than the sequence; mistral_sw8: a window of 8 tokens in 32;
# gemma3: a causal layer windowed to 8 tokens, then a global one (its query scale, RMS norms and two RoPEs);
# gemma3_bidirectional: use_bidirectional_attention=True on global layers (non-causal, no window)
MODELS = {"llama": ("llama", {}), "qwen2": ("qwen2", {}), "mistral": ("mistral", {}),
          "mistral_sw8": ("mistral", {"sliding_window": 8}), "gemma3": ("gemma3", {}),
          "gemma3_bidirectional": ("gemma3", {"use_bidirectional_attention": True,
                                              "layer_types": ["full_attention", "full_attention"]})}
LAYOUTS = ("zigzag", "contiguous")


def equivalence(name: str, layout: str, rank: int, world: int, mesh: SequenceMesh | None = None) -> dict[str, float]:
    """Worst relative errors of this rank's logits, the summed loss and the summed gradients (``mesh``:
    the sequence-parallel mesh, default a ring of the whole world)."""
    import ring_plugin.hf as hf

    kind, overrides = MODELS[name]
    batch = token_batch(2, 32)
    eager = tiny_model(kind, "eager", **overrides)
    ref = eager(**batch, use_cache=False)
    ref.loss.backward()
    ring = tiny_model(kind, "ring", **overrides)
    with ring_context(dist.group.WORLD, layout, mesh=mesh):
        out = ring(**hf.shard_batch(batch), use_cache=False)
        out.loss.backward()
        hf.reduce_gradients(ring)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    ref_grads = dict(eager.named_parameters())
    return {
        "logits": rel_err(out.logits, shard_sequence(ref.logits, 1, layout, rank, world)),
        "loss": rel_err(loss, ref.loss),
        "grads": max(rel_err(p.grad, ref_grads[n].grad) for n, p in ring.named_parameters()),
    }


def packed_equivalence(layout: str, rank: int, world: int) -> dict[str, float]:
    """A packed row (position_ids restarting at 0 per document) on the ring equals each document run
    alone by "eager": this rank's logits, and the gradients of the loss of every document's own labels."""
    import ring_plugin.hf as hf

    lengths = (11, 5, 16)  # documents cut across chunks and ranks
    batch = token_batch(1, 32, seed=4)
    batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
    eager = tiny_model("llama", "eager")
    logits, start, ref_loss = [], 0, 0.0
    labelled = 0
    for n in lengths:
        doc = {k: v[:, start:start + n] for k, v in batch.items() if k != "position_ids"}
        out = eager(**doc, use_cache=False)
        logits.append(out.logits)
        count = int((doc["labels"][:, 1:] != -100).sum())
        ref_loss = ref_loss + out.loss * count  # a token-weighted sum over the documents
        labelled += count
        start += n
    (ref_loss / labelled).backward()
    ring = tiny_model("llama", "ring")
    with ring_context(dist.group.WORLD, layout):
        sharded = hf.shard_batch(batch)
        out = ring(**sharded, use_cache=False)
        out.loss.backward()
        hf.reduce_gradients(ring)
    ref_grads = dict(eager.named_parameters())
    want = shard_sequence(torch.cat(logits, 1), 1, layout, rank, world)
    return {
        "logits": rel_err(out.logits, want),
        "grads": max(rel_err(p.grad, ref_grads[n].grad) for n, p in ring.named_parameters()),
    }


def data_parallel_equivalence(rank: int, world: int) -> dict[str, float]:
    """2 rings of 2 reading different rows: shard_batch counts the labels over both rings
    (data_parallel_group) and reduce_gradients sums over the world; the result equals one process on
    the 2-row batch."""
    import ring_plugin.hf as hf
    from ring_plugin.lightning.groups import build_ring_groups

    groups = build_ring_groups(2)
    batch = token_batch(2, 32, seed=2)
    eager = tiny_model("llama", "eager")
    ref = eager(**batch, use_cache=False)
    ref.loss.backward()
    ring = tiny_model("llama", "ring")
    row = slice(groups.dp_rank, groups.dp_rank + 1)
    with ring_context(groups.ring, "zigzag"):
        sharded = hf.shard_batch({k: v[row] for k, v in batch.items()}, data_parallel_group=groups.data_parallel)
        out = ring(**sharded, use_cache=False)
        out.loss.backward()
        hf.reduce_gradients(ring)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    ref_grads = dict(eager.named_parameters())
    return {
        "logits": rel_err(out.logits, shard_sequence(ref.logits[row], 1, "zigzag", groups.ring_rank, 2)),
        "loss": rel_err(loss, ref.loss),
        "grads": max(rel_err(p.grad, ref_grads[n].grad) for n, p in ring.named_parameters()),
    }


def refusal(case: str, rank: int, world: int) -> str:
    """Run a forward the ring must refuse; return the ValueError's text (anything else fails the test)."""
    import ring_plugin.hf as hf

    batch = hf.shard_batch(token_batch(2, 32), dist.group.WORLD, "contiguous")
    kwargs: dict = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    kind, overrides, train = "llama", {}, False
    if case == "missing_position_ids":  # right on rank 0 (contiguous), wrong on rank 1: both must raise
        kwargs.pop("position_ids")
    elif case == "packed":
        kwargs["position_ids"] = kwargs["position_ids"] % 8
    elif case == "padding_on_rank_1":
        kwargs["attention_mask"] = torch.ones_like(batch["input_ids"])
        kwargs["attention_mask"][:, -3:] = 1 - rank
    elif case == "dropout":
        overrides, train = dict(attention_dropout=0.1), True
    elif case == "use_cache_in_training":
        kwargs["use_cache"], train = True, True
    elif case == "gemma3_bidirectional_window":  # its window would be dropped: wrong logits, so refused
        kind, overrides = "gemma3", dict(use_bidirectional_attention=True)
    elif case == "gemma2_softcap":  # Gemma2 softcaps its attention logits (Gemma3 keeps the key but never applies it)
        kind, overrides = "gemma2", dict(attn_logit_softcapping=50.0)
    elif case == "llama4":  # position_ids are passed, its layers drop them: refused for what it is
        kind = "llama4"
    model = tiny_model(kind, "ring", **overrides).train(train)
    with ring_context(dist.group.WORLD, "contiguous"):
        try:
            model(**kwargs)
        except ValueError as err:
            return str(err)
        return "no error"


def direct_refusal(case: str, rank: int, world: int) -> str:
    """Softcap and attention sinks, through the attention function as models call it."""
    from ring_plugin.hf import ring_attention_forward

    q = torch.randn(1, 4, 8, 8)
    k = v = torch.randn(1, 2, 8, 8)
    module = torch.nn.Module()
    kwargs = {"softcap": {"softcap": 50.0}, "sinks": {"s_aux": torch.zeros(4)}}[case]
    positions = torch.arange(8 * rank, 8 * (rank + 1))[None]
    with ring_context(dist.group.WORLD, "contiguous"):
        try:
            ring_attention_forward(module, q, k, v, None, scaling=0.3, position_ids=positions, **kwargs)
        except ValueError as err:
            return str(err)
        return "no error"


REFUSALS = {
    "missing_position_ids": "not the global positions",
    "packed": "pass document_ids= as well",
    "padding_on_rank_1": "padding masks are not supported",
    "dropout": "dropout=0.1",
    "use_cache_in_training": "use_cache=True in training",
    "gemma3_bidirectional_window": "a sliding window (5) with bidirectional attention",  # Gemma3 halves it: 8 // 2 + 1
    "gemma2_softcap": "softcapping (softcap=50.0) is not supported",
    "llama4": "Llama4TextAttention (model_type 'llama4_text') is not supported by attn_implementation='ring'",
}
DIRECT = {"softcap": "softcap", "sinks": "attention sinks"}


def scaled_attention(layout: str, rank: int, world: int) -> dict[str, float]:
    """The attention function alone with a non-default ``scaling`` and grouped-query heads, against
    transformers' eager attention on the whole sequence (output rows and q/k/v gradients)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from ring_plugin.hf import ring_attention_forward

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 16, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    weight = torch.randn(2, 16, 4, 8, generator=g)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training, module.is_causal = 2, True, True
    causal = torch.full((16, 16), float("-inf")).triu(1)
    ref = eager_attention_forward(module, q, k, v, causal, scaling=0.3)[0]
    (ref * weight).sum().backward()
    ref_grads = [t.grad.clone() for t in (q, k, v)]
    shard = [shard_sequence(t.detach(), 2, layout, rank, world).requires_grad_() for t in (q, k, v)]
    positions = shard_sequence(torch.arange(16)[None], 1, layout, rank, world)
    with ring_context(dist.group.WORLD, layout):
        out = ring_attention_forward(module, *shard, None, scaling=0.3, position_ids=positions)[0]
        (out * shard_sequence(weight, 1, layout, rank, world)).sum().backward()
    errors = {"out": rel_err(out, shard_sequence(ref, 1, layout, rank, world))}
    # Each rank's dq/dk/dv are the full gradients of its own rows (the ring brings K/V gradients home).
    for name, t, r in zip("qkv", shard, ref_grads):
        errors["d" + name] = rel_err(t.grad, shard_sequence(r, 2, layout, rank, world))
    return errors


def world_worker(rank: int, world: int) -> dict:
    out: dict = {f"{k}/{lay}": equivalence(k, lay, rank, world) for k in MODELS for lay in LAYOUTS}
    out.update({f"scaled_gqa/{lay}": scaled_attention(lay, rank, world) for lay in LAYOUTS})
    out.update({f"packed/{lay}": packed_equivalence(lay, rank, world) for lay in LAYOUTS})
    if world == 4:
        out["dp2_ring2/zigzag"] = data_parallel_equivalence(rank, world)
    if world == 2:
        for case in REFUSALS:
            out[case] = refusal(case, rank, world)
        for case in DIRECT:
            out[case] = direct_refusal(case, rank, world)
        # After every refusal the ring is still in step: a good forward matches again.
        out["after_refusals"] = equivalence("llama", "zigzag", rank, world)
    return out


_RESULTS: dict[int, list[dict]] = {}


def results(size: int) -> list[dict]:
    """Every case of one spawned world of ``size`` ranks (spawned once per test module)."""
    if size not in _RESULTS:
        _RESULTS[size] = run_in_process_group(world_worker, size, timeout=240, reuse=True)
    return _RESULTS[size]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", [2, 4])
def test_ring_equals_eager_on_the_whole_sequence(size):
    names = [f"{k}/{lay}" for k in (*MODELS, "scaled_gqa", "packed") for lay in LAYOUTS]
    for rank, result in enumerate(results(size)):
        for name in names + (["after_refusals"] if size == 2 else ["dp2_ring2/zigzag"]):
            errors = result[name]
            assert max(errors.values()) <= 1e-5, (size, rank, name, errors)


@pytest.mark.timeout(300)
def test_refusals_are_raised_on_every_rank():
    texts_by_rank = results(2)
    for case, expected in {**REFUSALS, **DIRECT}.items():
        texts = [r[case] for r in texts_by_rank]
        assert all(t != "no error" for t in texts), (case, texts)
        # The rank with the bad input names it; its peers say which rank failed, so they never wait on it.
        assert any(expected in t for t in texts), (case, texts)
        assert all(expected in t or "failed on rank(s)" in t for t in texts), (case, texts)


def test_one_document_with_offset_positions_is_named_as_such():
    """A row of one document whose positions start at 100 is refused for that, not as transformers' arange."""
    from types import SimpleNamespace

    from ring_plugin.hf.structure import structure_error

    for layout in LAYOUTS:
        for rank in range(2):
            ring = SimpleNamespace(layout=layout, sequence_rank=rank, sequence_size=2)
            offset = shard_sequence(torch.arange(32)[None] + 100, 1, layout, rank, 2)
            error = structure_error(offset, None, 16, ring)
            assert error is not None and "shifted by 100" in error and "arange(n_local)" not in error, error
            local = torch.arange(16)[None]
            error = structure_error(local, None, 16, ring)
            if layout == "contiguous" and rank == 0:
                assert error is None  # the global positions of the first shard
            else:
                assert "arange(n_local) is wrong on every rank but the first" in error, error
