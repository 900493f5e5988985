"""The LM head kernel with each tile's argmax (interpreter, CPU): logits against F.linear within one rounding of
the weights' dtype (fp32: 1e-5), every partial the (maximum, first index) of the kernel's own logits over its
tile, NaN and -inf and ties as torch.argmax takes them, and GreedySelect.from_hidden's tokens, flags and counter
against the logits' path, bitwise, where the maximum stands clear of the rest."""

import pytest
import torch

pytest.importorskip("triton")

from kernels import lm_head  # noqa: E402
from kernels.greedy import greedy_select  # noqa: E402


def _run(h, w, scale, block_v=64, block_d=32):
    B, V = h.shape[0], w.shape[0]
    P = lm_head.tiles(V, block_v)
    logits = torch.full((B, V), 7.0)
    pval = torch.full((B, P), 7.0)
    pidx = torch.full((B, P), -1, dtype=torch.int32)
    lm_head.lm_head_partials(h, w, scale, logits, pval, pidx, block_v=block_v, block_d=block_d)
    return logits, pval, pidx


def _check_partials(logits, pval, pidx, block_v):
    B, V = logits.shape
    for b in range(B):
        for p in range(pval.shape[1]):
            tile = logits[b, p * block_v:(p + 1) * block_v]
            i = int(torch.argmax(tile))  # torch: the first NaN, else the first maximum
            assert int(pidx[b, p]) == p * block_v + i, (b, p)
            v = float(pval[b, p])
            assert (v != v and tile[i] != tile[i]) or v == float(tile[i]), (b, p, v, float(tile[i]))
        # the partials reduce to torch.argmax over the row
        best = int(torch.argmax(pval[b]))
        assert int(pidx[b, best]) == int(torch.argmax(logits[b])), b


@pytest.mark.parametrize("B,V,D", [(1, 300, 80), (3, 257, 64), (5, 64, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_logits_and_partials(B, V, D, dtype, scale):
    g = torch.Generator().manual_seed(B * 1000 + V)
    h = torch.randn(B, D, generator=g).to(dtype)
    w = torch.randn(V, D, generator=g).to(dtype)
    logits, pval, pidx = _run(h, w, scale)
    ref = lm_head.lm_head_reference(h, w, scale)
    if dtype == torch.float32:
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    else:  # the same sums in another order, each rounded to bf16: at most about one bf16 step apart
        torch.testing.assert_close(logits, ref, rtol=2 ** -7, atol=2e-2)
        assert torch.equal(logits, logits.bfloat16().float())  # the model's dtype, as fp32
    _check_partials(logits, pval, pidx, 64)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # the padded rows' 0 * -inf
def test_ties_nan_and_inf():
    B, V, D = 2, 200, 32
    g = torch.Generator().manual_seed(5)
    h = torch.rand(B, D, generator=g) + 0.5  # positive: a row of -inf weights gives -inf, not NaN
    w = torch.randn(V, D, generator=g)
    w[150] = w[20] = w[70] = 5.0  # the maximum three times: the first index (20) wins, across tiles
    w[130] = float("nan")  # a NaN in tile 2
    logits, pval, pidx = _run(h, w, 1.0)
    _check_partials(logits, pval, pidx, 64)
    assert int(pidx[0, 0]) == 20 and int(pidx[0, 1]) == 70
    assert int(pidx[0, 2]) == 130 and pval[0, 2] != pval[0, 2]
    one = _run(h[:1], w, 1.0)  # one row
    _check_partials(*one, 64)
    assert torch.equal(one[2], pidx[:1])
    # every logit -inf: the first index, as torch.argmax
    w = torch.full((V, D), float("-inf"))
    logits, pval, pidx = _run(h, w, 1.0)
    assert torch.isneginf(logits).all()
    assert pidx[:, 0].tolist() == [0, 0] and int(pidx[0, 3]) == 192
    _check_partials(logits, pval, pidx, 64)


def test_rejects_bad_shapes():
    h, w = torch.randn(2, 16), torch.randn(50, 16)
    with pytest.raises(ValueError, match="partials"):
        lm_head.lm_head_partials(h, w, 1.0, torch.empty(2, 50), torch.empty(2, 2), torch.empty(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="rows"):
        lm_head.lm_head_partials(torch.randn(2, 8), w, 1.0, torch.empty(2, 50), torch.empty(2, 1),
                                 torch.empty(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="logits"):
        lm_head.lm_head_partials(h, w, 1.0, torch.empty(2, 50, dtype=torch.bfloat16), torch.empty(2, 1),
                                 torch.empty(2, 1, dtype=torch.int32))


def test_greedy_select_over_partials_matches_logits():
    """The choice over the partials (index given) = the choice over the logits, kernel and reference."""
    g = torch.Generator().manual_seed(9)
    B, V, D, n = 3, 300, 48, 4
    h = torch.randn(B, D, generator=g)
    w = torch.randn(V, D, generator=g)
    w[11, :] = 0
    logits, pval, pidx = _run(h, w, 1.0)
    for force in (True, False):
        for done0 in ([False] * B, [True, False, False]):
            outs = []
            for parts in (True, False):
                st = [torch.zeros(B, dtype=torch.long), torch.zeros(B, n, dtype=torch.long), torch.tensor(done0),
                      torch.zeros(n, dtype=torch.bool), torch.tensor(5)]
                if parts:
                    greedy_select(pval, *st, 1, 11, force_triton=force, index=pidx)
                else:
                    greedy_select(logits, *st, 1, 11, force_triton=force)
                outs.append(st)
            for x, y in zip(*outs):
                assert torch.equal(x, y)


def test_from_hidden_matches_decode_path():
    """GreedySelect.from_hidden (the fused head, interpreted) against the model's logits path and the plain choice:
    the same tokens, output columns, flags and counter over a few steps (the maxima stand clear: random weights),
    and logits within one bf16 step."""
    from models.config import preset
    from models.generate import GreedySelect
    from models.switch import Switch

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = Switch(cfg).eval().to(torch.bfloat16).requires_grad_(False)
    B, n = 2, 4
    a = GreedySelect(B, n, torch.device("cpu"), cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id)
    b = GreedySelect(B, n, torch.device("cpu"), cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id)
    assert a.fuses_head(model, force_triton=True) and not a.fuses_head(model)  # no CUDA: the logits' path
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        # a planted winner per row: h leans on a random token's weight row
        w, _ = model.head()
        j = torch.randint(0, w.shape[0], (B,), generator=g)
        h = (torch.randn(B, cfg.d_model, generator=g) + 40 * w[j].float() / w[j].float().norm(dim=-1, keepdim=True))
        h = h.to(torch.bfloat16)
        la = a.from_hidden(model, h, force_triton=True)
        lb = model._logits(h[:, None])[:, 0].float()
        b(lb)
        torch.testing.assert_close(la, lb, rtol=2 ** -7, atol=2e-2)
        top2 = lb.topk(2, dim=-1).values
        # clear maxima (over 4 bf16 steps at their size): the choice cannot flip on a last bit
        assert ((top2[:, 0] - top2[:, 1]) > 4 * 2 ** -7 * top2[:, 0].abs()).all()
        for x, y in zip((a.tok, a.out, a.done, a.ended, a.t), (b.tok, b.out, b.done, b.ended, b.t)):
            assert torch.equal(x, y)
    # without force_triton on the CPU: the logits' path itself
    lc = a.from_hidden(model, h)
    assert torch.equal(lc, model._logits(h[:, None])[:, 0].float())


@pytest.mark.parametrize("B,V,D", [(1, 300, 80), (3, 257, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_final_add_and_norm_in_the_head(B, V, D, dtype):
    """add / norm_weight: the head of rmsnorm(h + add) (the final residual add and norm in the kernel) against the
    model's ops (the add, kernels/rmsnorm.py's reference, the head), within one rounding of the logits' dtype; with a
    norm weight far from ones and rows of different scales, so a wrong norm or a missing add shows."""
    g = torch.Generator().manual_seed(B * 7 + D)
    r = (torch.randn(B, D, generator=g) * torch.linspace(0.5, 8.0, B)[:, None]).to(dtype)
    y = torch.randn(B, D, generator=g).to(dtype)
    nw = (torch.rand(D, generator=g) * 2 + 0.1).to(dtype)
    w = torch.randn(V, D, generator=g).to(dtype)
    P = lm_head.tiles(V, 64)
    logits, pval, pidx = torch.full((B, V), 7.0), torch.full((B, P), 7.0), torch.full((B, P), -1, dtype=torch.int32)
    lm_head.lm_head_partials(r, w, 0.25, logits, pval, pidx, block_v=64, block_d=32, add=y, norm_weight=nw, eps=1e-6)
    ref = lm_head.lm_head_reference(r, w, 0.25, add=y, norm_weight=nw, eps=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-4)
    else:  # one bf16 step of the logits, and of the normalised row (its sum of squares in another order)
        torch.testing.assert_close(logits, ref, rtol=2 ** -6, atol=5e-2)
    _check_partials(logits, pval, pidx, 64)
    wrong = lm_head.lm_head_reference(r, w, 0.25)  # the head of h alone: far off
    assert (logits - wrong).abs().max() > 1.0
    with pytest.raises(ValueError, match="go together"):
        lm_head.lm_head_partials(r, w, 0.25, logits, pval, pidx, block_v=64, add=y)


def test_from_hidden_of_the_split_step_matches_decode_one_token():
    """GraphStep's fused path: Switch.decode_hidden(split_last=True) then from_hidden (the add, norm, head and
    choice in the kernels, interpreted) against decode_one_token's logits and the plain choice, step for step: the
    same tokens (clear maxima), logits within one bf16 step; decode_hidden's split parts sum to the final hidden
    state's input and the position advances once per step either way."""
    from models.config import preset
    from models.generate import GreedySelect
    from models.switch import Switch

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = Switch(cfg).eval().to(torch.bfloat16).requires_grad_(False)
    B, n = 2, 3
    ids = torch.randint(2, 100, (B, 6))
    sa, sb = model.prefill(ids, max_len=n), model.prefill(ids, max_len=n)
    a = GreedySelect(B, n, torch.device("cpu"), cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id)
    b = GreedySelect(B, n, torch.device("cpu"), cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id)
    clear_steps = 0
    for t in range(n):
        parts = model.decode_hidden(sa, a.tok, split_last=True)
        assert isinstance(parts, tuple) and int(sa.pos) == t + 1
        la = a.from_hidden(model, parts, force_triton=True)
        lb = model.decode_one_token(sb, b.tok)
        assert int(sb.pos) == t + 1
        torch.testing.assert_close(la, lb, rtol=2 ** -6, atol=5e-2)
        top2 = lb.topk(2, dim=-1).values
        clear = ((top2[:, 0] - top2[:, 1]) > 8 * 2 ** -7 * top2[:, 0].abs()).all()
        b(lb)
        if clear:
            clear_steps += 1
            for x, y in zip((a.tok, a.out, a.done, a.ended, a.t), (b.tok, b.out, b.done, b.ended, b.t)):
                assert torch.equal(x, y)
        else:  # a near tie in the random model: the next steps' inputs are taken from one side
            a.tok.copy_(b.tok)
    assert clear_steps >= 2  # the tokens were compared
    # the logits' path of the split form (no kernel): the final norm of the sum, then the head
    h = model.decode_hidden(model.prefill(ids, max_len=n), b.tok, split_last=True)
    want = model._logits(model.decoder.final_norm(h[0] + h[1])[:, None])[:, 0].float()
    assert torch.equal(GreedySelect(B, n, torch.device("cpu"), 0, 0, 1).from_hidden(model, h), want)
    with pytest.raises(ValueError, match="split_last"):
        model.half().decode_hidden(model.prefill(ids, max_len=n), b.tok, split_last=True)
