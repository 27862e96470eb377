"""Single-process checks of the model pieces: the nn.MultiheadAttention drop-in, the block, the GPT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ring_plugin.layers import RingMultiheadAttention, TransformerBlock
from ring_plugin.layers.rotary import RotaryEmbedding, apply_rotary
from ring_plugin.layers.transformer import MLP
from ring_plugin.models import GPTConfig, RingCausalLM, RingGPT
from ring_plugin.models.loss import linear_cross_entropy_sum


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_loads_torch_state_dict_and_matches(bias, causal, batch_first):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(30, 5, bias=bias, batch_first=batch_first)
    ring = RingMultiheadAttention(30, 5, bias=bias, batch_first=batch_first)
    ring.load_state_dict(ref.state_dict())
    x = torch.randn(3, 12, 30) if batch_first else torch.randn(12, 3, 30)
    mask = nn.Transformer.generate_square_subsequent_mask(12) if causal else None
    expected, _ = ref(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)
    got, weights = ring(x, x, x, is_causal=causal)
    assert weights is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mha_separate_kv_dims_load_and_match():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, kdim=10, vdim=6, batch_first=True)
    ring = RingMultiheadAttention(16, 4, kdim=10, vdim=6)
    ring.load_state_dict(ref.state_dict())
    q, k, v = torch.randn(2, 8, 16), torch.randn(2, 8, 10), torch.randn(2, 8, 6)
    torch.testing.assert_close(ring(q, k, v)[0], ref(q, k, v, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_mha_grouped_query_heads():
    ring = RingMultiheadAttention(24, 6, num_kv_heads=2)
    assert ring.in_proj_weight.shape == (24 + 2 * 8, 24)
    x = torch.randn(2, 8, 24)
    assert ring(x, x, x, is_causal=True)[0].shape == (2, 8, 24)


def test_mha_refuses_what_the_ring_cannot_do():
    ring = RingMultiheadAttention(8, 2)
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="need_weights=True is not supported"):
        ring(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask and key_padding_mask are not supported in the ring"):
        ring(x, x, x, attn_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="attn_mask and key_padding_mask"):
        ring(x, x, x, key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=2"):
        RingMultiheadAttention(8, 2, num_kv_heads=3)


def test_rotary_uses_global_positions():
    """Rotating a shard with its global positions equals slicing the rotated full sequence."""
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 16, 2, 8)
    full = apply_rotary(x, *rope(torch.arange(16)))
    rows = torch.tensor([4, 5, 6, 7, 8, 9, 10, 11])
    torch.testing.assert_close(apply_rotary(x[:, rows], *rope(rows)), full[:, rows])


@pytest.mark.parametrize("recompute_attention", [True, False])
def test_block_checkpointing_gives_same_gradients(recompute_attention):
    """Checkpointed blocks give the plain block's gradients; without attention recompute, backward
    runs the attention layer's forward zero times (once per block in all, against twice)."""
    torch.manual_seed(0)
    plain = TransformerBlock(24, 3, 1)
    ckpt = TransformerBlock(24, 3, 1, checkpointing=True, recompute_attention=recompute_attention)
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    ckpt.attn.attn.register_forward_hook(lambda *_: calls.append(1))
    cos, sin = RotaryEmbedding(8)(torch.arange(10))
    x = torch.randn(2, 10, 24, requires_grad=True)
    grads = []
    for block in (plain, ckpt):
        block(x, cos, sin, torch.tensor([[0] * 4 + [1] * 6] * 2)).square().sum().backward()
        grads.append(x.grad)
        x.grad = None
    torch.testing.assert_close(grads[1], grads[0])
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert len(calls) == (2 if recompute_attention else 1)


@pytest.mark.parametrize("checkpoint_layers", [None, 0, 2])
def test_gpt_checkpoints_only_the_first_checkpoint_layers_blocks(checkpoint_layers):
    """``checkpoint_layers=k`` checkpoints blocks 0..k-1 (all for None): the same gradients as no
    checkpointing, and the attention forward runs 3 + k times for 3 blocks (each recomputed block once more)."""
    torch.manual_seed(0)
    base = dict(vocab_size=40, n_layer=3, n_head=2, n_embd=16, max_seq_len=16)
    plain = RingGPT(GPTConfig(**base))
    ckpt = RingGPT(GPTConfig(**base, activation_checkpointing=True, checkpoint_layers=checkpoint_layers))
    ckpt.load_state_dict(plain.state_dict())
    k = 3 if checkpoint_layers is None else checkpoint_layers
    assert ckpt.config.checkpointed_layers == k
    assert [b.checkpointing for b in ckpt.blocks] == [i < k for i in range(3)]
    calls = []
    for block in ckpt.blocks:
        block.attn.attn.register_forward_hook(lambda *_: calls.append(1))
    ids, pos = torch.randint(0, 40, (2, 12)), torch.arange(12)
    for model in (plain, ckpt):
        model(ids, pos).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert len(calls) == 3 + k


@pytest.mark.parametrize("bad", [-1, 4, 1.5, True])
def test_gpt_checkpoint_layers_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="checkpoint_layers"):
        GPTConfig(n_layer=3, checkpoint_layers=bad)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True])
def test_gpt_mlp_tile_tokens_must_be_positive(bad):
    with pytest.raises(ValueError, match="mlp_tile_tokens"):
        GPTConfig(mlp_tile_tokens=bad)


@pytest.mark.parametrize("settings", [dict(), dict(activation_checkpointing=True, recompute_attention=False)])
def test_gpt_offload_needs_full_checkpointing(settings):
    with pytest.raises(ValueError, match="offload_checkpoints=True needs activation_checkpointing=True"):
        GPTConfig(offload_checkpoints=True, **settings)


def test_tiled_mlp_gives_the_whole_mlp_output_and_gradients():
    """Tiles of 4 over 11 tokens (the last one short): the same output and gradients as one MLP call, in
    training and without grad."""
    torch.manual_seed(0)
    whole, tiled = MLP(8, 32), MLP(8, 32, tile_tokens=4)
    tiled.load_state_dict(whole.state_dict())
    x = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    whole.double(), tiled.double()
    calls, dense = [], tiled.untiled
    tiled.untiled = lambda t: (calls.append(t.shape[-2]), dense(t))[1]
    outs, grads = [], []
    for mlp in (whole, tiled):
        out = mlp(x)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()])
        x.grad = None
    assert sorted(calls) == [3, 3, 4, 4, 4, 4]  # three tiles, each run again in backward
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(tiled(x), whole(x), rtol=1e-12, atol=1e-12)


def record_host_copies(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the tensors offloaded_checkpoint copies to the host, in order (filled as they are)."""
    import ring_plugin.layers.recompute as recompute

    shapes: list[tuple[int, ...]] = []
    host_copy = recompute.host_copy
    monkeypatch.setattr(recompute, "host_copy", lambda t: (shapes.append(tuple(t.shape)), host_copy(t))[1])
    return shapes


def test_offloaded_checkpoints_and_tiles_give_the_plain_models_gradients(monkeypatch):
    """Full checkpointing with the block inputs offloaded (through host_copy, counted here) and the MLP
    in tiles: the same gradients as the model without either; only the checkpointed blocks offload."""
    packed = record_host_copies(monkeypatch)
    torch.manual_seed(0)
    base = dict(vocab_size=40, n_layer=3, n_head=2, n_embd=16, max_seq_len=16)
    plain = RingGPT(GPTConfig(**base))
    long = RingGPT(GPTConfig(**base, activation_checkpointing=True, checkpoint_layers=2, offload_checkpoints=True,
                             mlp_tile_tokens=5))
    long.load_state_dict(plain.state_dict())
    ids, pos = torch.randint(0, 40, (2, 12)), torch.arange(12)
    for model in (plain, long):
        model(ids, pos).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), long.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    # Two checkpointed blocks, each keeping only its input (2, 12, 16) on the host.
    assert packed == [(2, 12, 16)] * 2, packed


def test_gpt_tied_head_parameters_and_flops():
    cfg = GPTConfig(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64)
    model = RingGPT(cfg)
    assert model.lm_head is None
    logits = model(torch.randint(0, 100, (2, 16)), torch.arange(16))
    assert logits.shape == (2, 16, 100)
    per_layer = 32 * (4 + 2 * 2) * 8 + 32 * 32 + 2 * 32 * 128 + 2 * 32  # qkv, proj, mlp, two norms
    assert model.num_parameters() == 100 * 32 + 2 * per_layer + 32
    matmul = 2 * (32 * 64 + 32 * 32 + 2 * 32 * 128) + 32 * 100
    attention = 2 * 4 * 4 * 8 * 1024 * 0.5
    assert model.flops_per_token(1024) == pytest.approx(3 * (2 * matmul + attention))
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.tensor([0, 64]))


def test_gpt_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_kv_head=3 must divide n_head=4"):
        GPTConfig(n_head=4, n_kv_head=3, n_embd=32)
    with pytest.raises(TypeError, match="unknown GPTConfig field"):
        RingCausalLM({"n_layers": 2})


def test_causal_lm_single_process_loss_is_token_mean():
    module = RingCausalLM(dict(vocab_size=50, n_layer=1, n_head=2, n_embd=16, max_seq_len=32))
    ids = torch.randint(0, 50, (2, 8))
    labels = torch.randint(0, 50, (2, 8))
    labels[0, :5] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(8).expand(2, 8)}
    loss = module.training_step(batch, 0)
    logits = module(ids, torch.arange(8))
    expected = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_linear_cross_entropy_matches_full_logits(dtype):
    torch.manual_seed(0)
    h = torch.randn(2, 37, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 50, (2, 37))
    y[0, :7] = -100
    got = linear_cross_entropy_sum(h, w, y, chunk=8)
    (0.7 * got).backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    expected = nn.functional.cross_entropy((h @ w.t()).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    (0.7 * expected).backward()
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got, expected, **tol)
    torch.testing.assert_close(grads[0], h.grad, **tol)
    torch.testing.assert_close(grads[1], w.grad, **tol)


def test_chunked_linear_cross_entropy_in_bf16_is_as_close_as_plain_bf16_autograd():
    """bf16 hidden states: the head's weight gradient is a bf16 GEMM (fp32 accumulation); its error
    against fp64 stays within 2x that of autograd through bf16 logits (what autocast would run)."""
    torch.manual_seed(1)
    h64, w64 = torch.randn(3, 200, 64, dtype=torch.float64), torch.randn(97, 64, dtype=torch.float64) * 0.3
    y = torch.randint(0, 97, (3, 200))
    y[1, :9] = -100

    def loss_and_grads(fn, dtype):
        h, w = (t.to(dtype).clone().requires_grad_() for t in (h64, w64))
        fn(h, w).backward()
        return [t.double() for t in (fn(h, w).detach(), h.grad, w.grad)]

    def full(h, w):
        return nn.functional.cross_entropy((h @ w.t()).float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                           reduction="sum")

    exact = loss_and_grads(full, torch.float64)
    plain = loss_and_grads(full, torch.bfloat16)
    ours = loss_and_grads(lambda h, w: linear_cross_entropy_sum(h, w, y, chunk=64), torch.bfloat16)
    for name, e, p, o in zip(("loss", "dh", "dw"), exact, plain, ours):
        assert o.dtype == torch.float64
        ours_err, plain_err = (o - e).norm() / e.norm(), (p - e).norm() / e.norm()
        assert ours_err <= 2 * plain_err + 1e-6, (name, float(ours_err), float(plain_err))
        assert ours_err < 2e-2, name
