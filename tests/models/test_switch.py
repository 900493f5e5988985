"""Model behaviour beyond parity: dtypes, padding, cache, tokenizer, configs."""

import pytest
import torch

from models.config import PRESETS, ConfigError, SwitchConfig, preset
from models.generate import beam_search, greedy
from models.switch import Switch
from models.tokenizer import ByteTokenizer, load_tokenizer


def _model(seed=0, **over):
    torch.manual_seed(seed)
    return Switch(preset("tiny", **over)).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.08), (torch.float16, 0.02)])
def test_half_precision_close_to_fp32(dtype, tol):
    model = _model()
    x = torch.randint(3, 384, (2, 10))
    y = torch.randint(3, 384, (2, 6))
    with torch.no_grad():
        ref = model(x, labels=y)
        half = model.to(dtype)(x, labels=y)
    assert half.logits.dtype == dtype
    rel = (half.logits.float() - ref.logits).norm() / ref.logits.norm()
    assert rel < tol, rel
    assert model.moes[0].router.weight.dtype == dtype  # stored in model dtype, applied in fp32


def test_padding_does_not_change_a_prompt_output():
    model = _model(seed=1)
    tok = ByteTokenizer()
    prompts = ["def f(x): return x", "a much longer prompt with more bytes in it"]
    batch = tok(prompts)
    both = greedy(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6, eos_token_id=-1)
    alone = tok(prompts[:1])
    one = greedy(model, alone["input_ids"], alone["attention_mask"], max_new_tokens=6, eos_token_id=-1)
    assert torch.equal(both[0], one[0])


def test_decode_step_matches_teacher_forcing():
    model = _model(seed=2)
    x = torch.randint(3, 384, (3, 8))
    state = model.prefill(x, max_len=6)
    dec = torch.randint(3, 384, (3, 6))
    dec[:, 0] = 0
    steps = torch.stack([model.decode_one_token(state, dec[:, t]) for t in range(6)], dim=1)
    with torch.no_grad():
        full = model(x, decoder_input_ids=dec).logits
    assert (steps - full).abs().max() < 1e-5
    assert state.pos.item() == 6


def test_beam_one_equals_greedy_and_beams_score_at_least_greedy():
    model = _model(seed=3)
    x = torch.randint(3, 384, (2, 8))
    g = greedy(model, x, max_new_tokens=5, eos_token_id=-1)
    b1 = beam_search(model, x, max_new_tokens=5, num_beams=1, eos_token_id=-1)
    assert torch.equal(g, b1)

    def logprob(seq):
        dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), seq[:, :-1]], 1)
        with torch.no_grad():
            lp = torch.log_softmax(model(x, decoder_input_ids=dec).logits, -1)
        return lp.gather(-1, seq[..., None]).sum((1, 2))

    b4 = beam_search(model, x, max_new_tokens=5, num_beams=4, eos_token_id=-1)
    assert (logprob(b4) >= logprob(g) - 1e-5).all()


def test_training_mode_uses_dropout_and_jitter_and_backprops():
    model = _model(seed=4, dropout_rate=0.1)
    model.train()
    x, y = torch.randint(3, 384, (2, 8)), torch.randint(3, 384, (2, 5))
    out = model(x, labels=y)
    out.loss.backward()
    assert out.z_loss > 0 and out.aux_loss > 0
    assert model.moes[0].w_in.grad is not None and model.moes[0].router.weight.grad is not None


def test_named_presets_match_published_sizes():
    base = preset("switch-base-128")
    assert (base.d_model, base.d_ff, base.num_experts, base.num_heads) == (768, 3072, 128, 12)
    assert base.sparse_layers(decoder=False) == [1, 3, 5, 7, 9, 11]
    large = preset("switch-large-128")
    assert (large.d_model, large.d_ff, large.num_layers, len(large.sparse_layers(True))) == (1024, 4096, 24, 12)
    assert base.expert_bytes(2) == 9_437_184  # 9.4 MB in bf16, as in PAPER.md
    assert {"tiny", "switch-base-8", "switch-base-16", "switch-base-32", "switch-base-64",
            "switch-base-256", "switch-large-128"} <= set(PRESETS)


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="unknown model preset 'switch-base-9'"):
        preset("switch-base-9")
    with pytest.raises(ConfigError, match="dense_act_fn"):
        SwitchConfig(dense_act_fn="tanh")
    with pytest.raises(ConfigError, match="num_experts"):
        SwitchConfig(num_experts=0)


def test_byte_tokenizer_round_trip_and_sentinels(tmp_path):
    tok = ByteTokenizer(384)
    text = "naïve <extra_id_0> code <extra_id_124>"
    ids = tok.encode(text)
    assert ids[-1] == tok.eos_token_id and tok.sentinel(0) in ids and tok.sentinel(124) in ids
    assert tok.decode(ids) == text
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).vocab_size == 384
    with pytest.raises(ValueError, match="sentinel 125"):
        tok.sentinel(125)


def test_hf_tokenizer_files_are_used(tmp_path):
    """A checkpoint dir with a tokenizer.json gets that tokenizer (built here, offline)."""
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}
    model = tokenizers.models.WordLevel(vocab, unk_token="<unk>")
    t = tokenizers.Tokenizer(model)
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hello world", add_eos=False) == [3, 4]
    assert tok.decode([3, 4]) == "hello world"


def test_fused_qkv_shares_storage_and_gives_the_same_logits():
    model = _model(seed=5)
    x, y = torch.randint(3, 384, (2, 9)), torch.randint(3, 384, (2, 4))
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        ref = model(x, labels=y).logits
        model.fuse_for_inference()
        fused = model(x, labels=y).logits
    att = model.encoder.blocks[0].self_attn
    assert att.qkv_fused() and att.k.weight.data_ptr() == att._qkv_weight[att.q.weight.shape[0]:].data_ptr()
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert (ref - fused).abs().max() < 1e-5
    # training updates the views, so the fused matrix never goes stale
    with torch.no_grad():
        att.v.weight.add_(1.0)
    assert torch.equal(att._qkv_weight[2 * att.q.weight.shape[0]:], att.v.weight)
    # a dtype change gives the weights new storage: the fused path steps aside
    model.to(torch.float64)
    assert not att.qkv_fused()
    with torch.no_grad():
        model(x.clone(), labels=y)


def test_grouped_training_path_matches_reference_loop():
    """SparseMLP.train_backend="grouped" (bf16 grouped GEMMs) trains like the reference loop."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    model = _model(seed=6, dropout_rate=0.0, router_jitter_noise=0.0).train()
    x, y = torch.randint(3, 384, (2, 9)), torch.randint(3, 384, (2, 5))
    ref = model(x, labels=y)
    ref.loss.backward()
    g_ref = model.moes[0].w_in.grad.clone()
    model.zero_grad()
    for moe in model.moes:
        moe.train_backend = "grouped"
    try:
        out = model(x, labels=y)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no grouped GEMM on this device: {e}")
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 2e-2  # bf16 compute inside the experts
    g = model.moes[0].w_in.grad
    # bf16 operands (the grouped path) against the fp32 loop, through the whole model: a few 1e-2
    assert ((g - g_ref).norm() / g_ref.norm()).item() < 6e-2


def _scripted(table, V=16):
    """A stand-in model whose step t emits table[:, t] (one-hot logits), counting the steps it runs."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)
    runs = []

    def step(state, tok):
        t = len(runs)
        runs.append(tok.clone())
        return torch.nn.functional.one_hot(table[:, t], V).float()

    return SimpleNamespace(cfg=cfg), step, runs


def _greedy_reference(table, n, eos=1, pad=0):
    """Greedy's output by definition: each row's tokens up to and including its EOS, then pad; stop at
    the first step after which every row has ended (or at n)."""
    done = torch.zeros(table.shape[0], dtype=torch.bool)
    cols = []
    for t in range(n):
        nxt = torch.where(done, torch.full_like(table[:, t], pad), table[:, t])
        cols.append(nxt)
        done |= nxt == eos
        if bool(done.all()):
            break
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("captured", [False, True])
@pytest.mark.parametrize("eos_at,n", [((2, 4), 8), ((4, 4), 8), ((7, 3), 8), ((9, 9), 8), ((0, 0), 8), ((3, 5), 5)])
def test_greedy_stops_one_step_late_without_changing_the_output(eos_at, n, captured):
    """Greedy queues step t + 1 before it reads whether every row ended at step t: the output, the
    tokens fed to each step and the on_token calls are those of a loop that checks after every step,
    and exactly one extra step runs where all rows ended before max_new_tokens. captured: the token choice
    (GreedySelect) runs inside the step, as in a CUDA graph that captured it, fed by its own tok buffer."""
    from models.generate import GreedySelect

    g = torch.Generator().manual_seed(sum(eos_at) + n)
    table = torch.randint(2, 16, (2, 10), generator=g)
    for r, t in enumerate(eos_at):
        if t < 10:
            table[r, t] = 1
    model, step, runs = _scripted(table)
    kw = {}
    if captured:
        sel = GreedySelect(2, n + 2, "cpu", start_token=0, pad_token=0, eos_token=1)  # (more room than needed)
        inner = step

        def step(state, tok):
            assert tok is sel.tok
            logits = inner(state, tok)
            sel(logits)
            return logits

        sel.captured = True
        kw["select"] = sel
    seen = []
    out = greedy(model, torch.zeros(2, 3, dtype=torch.long), max_new_tokens=n, step=step, state=object(),
                 on_token=seen.append, **kw)
    want = _greedy_reference(table, n)
    assert torch.equal(out, want)
    assert seen == list(range(want.shape[1]))
    assert len(runs) == want.shape[1] + (1 if want.shape[1] < n else 0)
    # each step was fed the previous step's (padded) output
    for t in range(1, want.shape[1]):
        assert torch.equal(runs[t], want[:, t - 1])


def test_greedy_refuses_a_select_of_another_shape():
    """A GreedySelect made for another batch, fewer tokens or another EOS is an error naming both shapes."""
    from models.generate import GreedySelect

    model, step, _ = _scripted(torch.randint(2, 16, (2, 10)))
    for sel in (GreedySelect(3, 8, "cpu", 0, 0, 1), GreedySelect(2, 4, "cpu", 0, 0, 1),
                GreedySelect(2, 8, "cpu", 0, 0, 5)):
        with pytest.raises(ValueError, match="GreedySelect for batch"):
            greedy(model, torch.zeros(2, 3, dtype=torch.long), max_new_tokens=8, step=step, state=object(), select=sel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_with_fused_add_norm_and_one_kv_write(dtype, monkeypatch):
    """The decode path's fusions: both self caches written in one launch through self_kv (against two writes:
    the same caches and logits, bitwise); each residual add taken into the next norm's kernel (models.switch.add_norm)
    and the dense layers through the expert FFN's decode kernels, forced through the Triton interpreter: the same
    logits as the adds, norms and matrix products: against the same weights' fp64 model, an error of at most 1e-5
    (fp32) or twice the unfused path's own (bf16, whose rounding the order of the sums moves)."""
    import copy

    pytest.importorskip("triton")
    import models.switch as sw

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _model(seed=11).to(dtype).fuse_for_inference()
    exact_model = copy.deepcopy(model).double()
    x = torch.randint(3, 384, (2, 7))
    toks = torch.randint(3, 384, (2, 4))

    def run(one_write: bool, fused_add: bool):
        monkeypatch.setenv("PGMOE_FORCE_TRITON", "1" if fused_add else "0")  # every Triton kernel of the model
        state = model.prefill(x, max_len=6)
        if not one_write:
            state.self_kv_keep, state.self_kv = state.self_kv, None  # the lists stay its views: two writes
        out = [model.decode_one_token(state, toks[:, t]) for t in range(toks.shape[1])]
        kv = state.self_kv if one_write else state.self_kv_keep
        return torch.stack(out, 1), kv.clone()

    ref, ref_kv = run(False, False)
    one, one_kv = run(True, False)
    assert torch.equal(one, ref) and torch.equal(one_kv, ref_kv)
    assert ref_kv[:, :, :, :, : toks.shape[1]].abs().sum() > 0  # the written positions hold keys and values
    calls = []
    kernel = sw.add_rmsnorm
    monkeypatch.setattr(sw, "add_rmsnorm", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    fused, fused_kv = run(True, True)
    n_dec = len(model.decoder.blocks)
    assert len(calls) >= toks.shape[1] * 3 * n_dec  # every add of every decode step went through the kernel
    dense = [b.ff for b in model.decoder.blocks if not b.sparse]
    assert dense and all(ff._one_expert for ff in dense)  # the dense layers took the decode kernels
    monkeypatch.setenv("PGMOE_FORCE_TRITON", "0")
    state = exact_model.prefill(x, max_len=6)
    exact = torch.stack([exact_model.decode_one_token(state, toks[:, t]) for t in range(toks.shape[1])], 1).double()

    def err(a):
        return ((a.double() - exact).norm() / exact.norm()).item()

    assert err(fused) <= max(1e-5, 2 * err(ref)), (err(fused), err(ref))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("rows", [1, 4])
def test_dense_ff_through_the_decode_kernels(dtype, tol, rows, monkeypatch):
    """DenseFF over a decode step's rows as one expert of the expert FFN's decode kernels (Triton interpreter)
    against its matrix products in fp64, within tol; training, a prefill's rows or PGMOE_DENSE_KERNEL=0 keep the
    products."""
    pytest.importorskip("triton")
    import models.switch as sw

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PGMOE_FORCE_TRITON", "1")
    torch.manual_seed(rows)
    ff = sw.DenseFF(preset("tiny")).to(dtype).eval()
    x = torch.randn(rows, 1, ff.wi.in_features).to(dtype)
    with torch.no_grad():
        assert ff.decode_kernels(x)
        got = ff(x)
    ref = torch.relu(x.double() @ ff.wi.weight.double().t()) @ ff.wo.weight.double().t()
    assert got.shape == x.shape and got.dtype == dtype
    rel = ((got.double() - ref).norm() / ref.norm()).item()
    assert rel <= tol, rel
    with torch.no_grad():
        assert not ff.decode_kernels(torch.randn(2, 17, ff.wi.in_features).to(dtype))  # a prefill's rows
        monkeypatch.setenv("PGMOE_DENSE_KERNEL", "0")
        assert not ff.decode_kernels(x)
    assert not ff.decode_kernels(x)  # (grad enabled)
