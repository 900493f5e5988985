"""The one-query attention kernel equals a float64 reference (Triton interpreter on the CPU), repeats bitwise,
reads views as they are, handles T5's masks, and serves the model's decode step under backend triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels.decode_attention import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    use_decode_attention,
)


def _inputs(B, H, K, D, dtype, bias_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).to(dtype).transpose(1, 2)  # a view, as Attention.heads makes it
    cache = torch.randn(B, H, K + 5, D, generator=g).to(dtype)  # k: a slice of a longer cache (strided)
    k = cache[:, :, :K]
    v = torch.randn(B, H, K, D, generator=g).to(dtype)
    bias = {"none": None,
            "heads": torch.randn(1, H, 1, K, generator=g).to(dtype),  # position bias, broadcast over rows
            "rows": torch.randn(B, 1, 1, K, generator=g).to(dtype)}[bias_kind]  # padding bias, over heads
    return q, k, v, bias


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("B,H,K,D", [(1, 1, 1, 24), (3, 4, 37, 24), (2, 3, 300, 64)])
@pytest.mark.parametrize("bias_kind", ["none", "heads", "rows"])
def test_fp32_matches_reference(B, H, K, D, bias_kind):
    q, k, v, bias = _inputs(B, H, K, D, torch.float32, bias_kind, seed=K)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), None if bias is None else bias.double(), 0.7)
    got = decode_attention(q, k, v, bias, scale=0.7)
    assert got.shape == (B, H, 1, D) and got.dtype == torch.float32
    assert _rel(got, ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_within_twice_torchs_own_error(dtype):
    """bf16 / fp16: at most 2x the error of PyTorch's own attention in that dtype (SDPA), both against float64."""
    q, k, v, bias = _inputs(2, 4, 200, 64, dtype, "heads", seed=7)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), bias.double(), 1.0)
    own = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    got = decode_attention(q, k, v, bias, scale=1.0)
    assert got.dtype == dtype
    assert _rel(got, ref) <= 2 * _rel(own, ref)


def test_blocks_of_keys_and_repeatability():
    """Any block size gives the same values within fp32 rounding; one config gives bitwise the same result twice."""
    q, k, v, bias = _inputs(2, 2, 130, 32, torch.float32, "rows", seed=3)
    outs = [decode_attention(q, k, v, bias, config={"BLOCK_K": bk, "num_warps": 4}) for bk in (16, 64, 256)]
    for o in outs[1:]:
        assert torch.allclose(o, outs[0], rtol=1e-5, atol=1e-6)
    again = decode_attention(q, k, v, bias, config={"BLOCK_K": 16, "num_warps": 4})
    assert torch.equal(again, outs[0])


def test_t5_masks():
    """The decoder's causal mask (finfo.min at future positions, a whole first block masked among them) and a
    padded encoder row: the masked keys get no weight."""
    B, H, K, D = 2, 2, 40, 16
    q, k, v, _ = _inputs(B, H, K, D, torch.float32, "none", seed=11)
    lo = torch.finfo(torch.float32).min
    bias = torch.zeros(B, H, 1, K)
    bias[..., :20] = lo  # the first 20 keys (more than one block of 16) masked
    bias[1, :, :, 35:] = lo
    got = decode_attention(q, k, v, bias, config={"BLOCK_K": 16, "num_warps": 4})
    for b, keep in ((0, slice(20, K)), (1, slice(20, 35))):
        ref = decode_attention_reference(q[b : b + 1].double(), k[b : b + 1, :, keep].double(),
                                         v[b : b + 1, :, keep].double())
        assert _rel(got[b : b + 1], ref) <= 1e-5


def test_bad_shapes_are_refused():
    q, k, v, bias = _inputs(2, 3, 10, 8, torch.float32, "heads")
    with pytest.raises(ValueError, match=r"q must be \[B, H, 1, D\]"):
        decode_attention(q.expand(2, 3, 2, 8), k, v)
    with pytest.raises(ValueError, match="k and v must be"):
        decode_attention(q, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="does not broadcast"):
        decode_attention(q, k, v, torch.zeros(1, 3, 1, 11))
    with pytest.raises(ValueError, match="additive float mask"):
        decode_attention(q, k, v, torch.ones(1, 3, 1, 10, dtype=torch.bool))


def test_model_decode_step_uses_the_kernel(monkeypatch):
    """Backend triton: the decode step's attention is the kernel (called, and the step's logits within fp32
    rounding of SDPA's); backend torch: SDPA."""
    from kernels import decode_attention as mod
    from models.config import preset
    from models.switch import Switch

    monkeypatch.setenv("PGMOE_FORCE_TRITON", "1")
    torch.manual_seed(0)
    model = Switch(preset("tiny")).eval()
    ids = torch.randint(3, model.cfg.vocab_size, (2, 9))
    tok = torch.tensor([0, 0])
    with torch.no_grad():
        ref = model.decode_one_token(model.prefill(ids, max_len=4), tok)
        calls = []
        orig = mod.decode_attention

        def counting(*a, **kw):
            calls.append(1)
            return orig(*a, **kw)

        monkeypatch.setattr("models.switch.decode_attention", counting)
        for att in [b.self_attn for b in model.decoder.blocks] + [b.cross_attn for b in model.decoder.blocks]:
            att.decode_kernel = True  # what set_backend("triton") sets, without the MoE's Triton kernels
        assert use_decode_attention(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 3, 4))
        assert not use_decode_attention(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 3, 4),
                                        torch.ones(1, 1, 1, 3, dtype=torch.bool))  # a boolean mask: SDPA's
        got = model.decode_one_token(model.prefill(ids, max_len=4), tok)
    assert len(calls) == 2 * len(model.decoder.blocks)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert model.set_backend("torch").decoder.blocks[0].cross_attn.decode_kernel is False
    assert model.set_backend("triton").decoder.blocks[0].self_attn.decode_kernel is True
