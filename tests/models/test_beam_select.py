"""BeamSelect (beam search's choice as fixed-shape tensor operations, capturable in a CUDA graph) against a
plain host-side beam search written the straightforward way (Python lists of finished hypotheses, sorted as
they come), on the same per-step logits: random, with eos made likely so hypotheses finish at many ranks and
steps, and rounded to a coarse grid so scores tie. Outputs must be equal token for token."""

import pytest
import torch

from models.generate import BeamSelect, _decode_loop

EOS, PAD, START = 1, 0, 0


def host_beam_search(logits_per_step, B, nb, length_penalty):
    """The reference: per step, 2 * nb candidates in rank order; eos among the first nb finish a hypothesis
    (kept if fewer than nb are kept or it beats the worst); the first nb others run on; a prompt is done once
    nb are kept and the worst is at least the best running score over the length."""
    scores = torch.full((B, nb), -1e9)
    scores[:, 0] = 0.0
    seqs = torch.zeros(B * nb, 0, dtype=torch.long)
    finished = [[] for _ in range(B)]
    done = [False] * B

    def worst(b):
        return min(s for s, _ in finished[b]) if len(finished[b]) >= nb else -float("inf")

    steps = 0
    for t, logits in enumerate(logits_per_step):
        steps = t + 1
        logp = torch.log_softmax(logits, dim=-1)
        V = logp.shape[-1]
        cand = (logp + scores.view(-1, 1)).view(B, nb * V)
        top_s, top_i = cand.topk(2 * nb, dim=1)
        beam_i, tok_i = top_i // V, top_i % V
        nxt = [[[-1e9, float(PAD), 0.0] for _ in range(nb)] for _ in range(B)]
        cur_len = t + 1
        for b in range(B):
            if done[b]:
                continue
            n = 0
            for rank in range(2 * nb):
                s, bi, ti = top_s[b, rank].item(), beam_i[b, rank].item(), tok_i[b, rank].item()
                if ti == EOS:
                    if rank >= nb:
                        continue
                    hyp = torch.cat([seqs[b * nb + bi], seqs.new_tensor([ti])])
                    score = s / (cur_len**length_penalty)
                    if len(finished[b]) < nb or score > worst(b):
                        finished[b].append((score, hyp))
                        finished[b].sort(key=lambda x: -x[0])
                        del finished[b][nb:]
                else:
                    nxt[b][n] = [s, float(ti), float(bi)]
                    n += 1
                if n == nb:
                    break
            best_running = max(v[0] for v in nxt[b])
            if len(finished[b]) >= nb and worst(b) >= best_running / (cur_len**length_penalty):
                done[b] = True
        packed = torch.tensor(nxt, dtype=torch.float64)
        next_scores, next_tok, next_src = packed[..., 0].float(), packed[..., 1].long(), packed[..., 2].long()
        src = (next_src + torch.arange(B)[:, None] * nb).view(-1)
        seqs = torch.cat([seqs[src], next_tok.view(-1, 1)], dim=1)
        scores = next_scores
        if all(done):
            break
    best = []
    for b in range(B):
        if not done[b]:
            for j in range(nb):
                s = scores[b, j].item()
                if s <= -1e8:
                    continue
                score = s / (seqs.shape[1] ** length_penalty)
                if len(finished[b]) < nb or score > worst(b):
                    finished[b].append((score, seqs[b * nb + j]))
                    finished[b].sort(key=lambda x: -x[0])
                    del finished[b][nb:]
        best.append(finished[b][0][1])
    n = max(len(h) for h in best)
    out = torch.full((B, n), PAD, dtype=torch.long)
    for b, h in enumerate(best):
        out[b, : len(h)] = h
    return out, steps


def _logits(seed, steps, B, nb, V, eos_boost, grid, same_rows=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(B * nb, V, generator=g) * 2
        x[:, EOS] += eos_boost * torch.rand(B * nb, generator=g)
        if grid:  # a coarse grid: equal logits, so equal candidate and hypothesis scores
            x = (x * grid).round() / grid
        if same_rows:  # every beam sees the same logits: beams of equal score tie on every candidate
            x = x[:1].expand(B * nb, V).clone()
        out.append(x)
    return out


@pytest.mark.parametrize("seed,B,nb,V,steps,eos_boost,grid,lp,same,min_ties", [
    (0, 1, 4, 11, 12, 2.0, 0, 1.0, False, 0),
    (1, 3, 4, 9, 16, 3.0, 0, 1.0, False, 0),
    (2, 2, 2, 7, 10, 4.0, 2, 1.0, False, 0),
    (3, 4, 3, 13, 20, 1.5, 1, 0.6, False, 0),  # another length penalty
    (4, 2, 4, 6, 8, 0.0, 0, 2.0, False, 0),    # eos rarely: prompts end by length
    (5, 1, 1, 8, 6, 3.0, 0, 1.0, False, 0),    # one beam
    (7, 2, 4, 6, 12, 2.5, 1, 1.0, True, 2),    # tied hypotheses kept (equal scores: which to keep, in what order)
    (7, 3, 3, 5, 12, 3.0, 1, 1.0, True, 3),
    (6, 2, 3, 4, 12, 2.0, 2, 1.0, True, 2),
])
def test_beam_select_equals_host_beam_search(seed, B, nb, V, steps, eos_boost, grid, lp, same, min_ties):
    logits = _logits(seed, steps, B, nb, V, eos_boost, grid, same)
    want, want_steps = host_beam_search(logits, B, nb, lp)

    sel = BeamSelect(B, nb, steps, "cpu", START, PAD, EOS, lp)
    it = iter(logits)
    got_steps = _decode_loop(lambda _state, _tok: next(it), None, sel, steps, None, cuda=False)
    assert got_steps == want_steps
    assert torch.equal(sel.result(got_steps), want)
    # the cases exercise what they are for: hypotheses finished, and (where asked) equal scores among those kept
    assert (sel.fin_scores > -float("inf")).any() or eos_boost == 0
    kept = [[x for x in row if x > -float("inf")] for row in sel.fin_scores.tolist()]
    assert sum(len(set(r)) < len(r) for r in kept) >= min_ties


def test_beam_select_reorders_the_state_and_resets():
    """The state's caches follow the chosen beams (reorder(src) with each prompt's rows; the self-attention caches
    only, after reset() made each prompt's rows copies of its first beam's, all caches), tok is the running
    beams' tokens, and reset() brings back the first step (only beam 0 live, start tokens)."""
    B, nb, V = 2, 3, 10

    class State:
        def __init__(self):
            self.srcs = []
            self.deferred = None

        def reorder(self, index, cross=True):
            self.srcs.append((index.clone(), cross))

        def defer_reorder(self, rows):
            self.deferred = rows

        def clear_deferred(self):
            self.deferred.copy_(torch.arange(self.deferred.numel()))

    st = State()
    sel = BeamSelect(B, nb, 5, "cpu", START, PAD, EOS, 1.0, state=st)
    first = torch.tensor([0, 0, 0, 3, 3, 3])
    assert len(st.srcs) == 1 and torch.equal(st.srcs[0][0], first) and st.srcs[0][1]
    assert st.deferred is sel.src and torch.equal(sel.src, torch.arange(B * nb))  # nothing pending at first
    logits = _logits(7, 1, B, nb, V, 0.0, 0)[0]
    logits[:, EOS] = -30.0  # nothing ends
    sel(logits)
    assert len(st.srcs) == 1  # the choice's reorder is deferred to the next step's start: sel.src
    src, cross = sel.src, False
    # step 1: every beam comes from its prompt's first beam (the only live one)
    assert torch.equal(src, first) and not cross
    top = torch.log_softmax(logits, -1).view(B, nb, V)[:, 0].topk(nb, dim=1)
    assert torch.equal(sel.tok.view(B, nb), top.indices)
    assert torch.equal(sel.scores, top.values)
    sel.reset()
    assert torch.equal(sel.tok, torch.full((B * nb,), START)) and sel.t.item() == 0
    assert torch.equal(sel.src, torch.arange(B * nb))
    assert sel.scores[:, 0].eq(0).all() and sel.scores[:, 1:].eq(-1e9).all()


def test_reorder_of_the_one_buffer_equals_per_block_reorders():
    """Model.prefill's state keeps every block's self-attention cache in one buffer (self_kv; self_k / self_v are
    its views): reorder gathers it at once, with the same result as reordering each block's tensors."""
    from models.config import preset
    from models.switch import Switch

    torch.manual_seed(0)
    model = Switch(preset("tiny")).eval()
    ids = torch.randint(2, 100, (4, 7))
    state = model.prefill(ids, max_len=5)
    assert state.self_kv is not None
    assert all(k.data_ptr() == state.self_kv[0, i].data_ptr() for i, k in enumerate(state.self_k))
    for buf in (*state.self_k, *state.self_v):
        buf.copy_(torch.randn_like(buf))
    index = torch.tensor([2, 2, 0, 3])
    want_self = [b.index_select(0, index) for b in (*state.self_k, *state.self_v)]
    want_cross = [b.clone() for b in (*state.cross_k, *state.cross_v, state.enc_bias)]
    state.reorder(index, cross=False)
    assert all(torch.equal(b, w) for b, w in zip((*state.self_k, *state.self_v), want_self))
    assert all(torch.equal(b, w) for b, w in zip((*state.cross_k, *state.cross_v, state.enc_bias), want_cross))
    want_cross = [b.index_select(0, index) for b in want_cross]
    want_self = [b.index_select(0, index) for b in want_self]
    state.reorder(index)
    assert all(torch.equal(b, w) for b, w in zip((*state.self_k, *state.self_v), want_self))
    assert all(torch.equal(b, w) for b, w in zip((*state.cross_k, *state.cross_v, state.enc_bias), want_cross))


def test_deferred_reorder_runs_at_the_next_step_start():
    """defer_reorder(rows): decode_one_token applies the rows to the self caches before computing (the same logits
    and caches as an explicit reorder right before the step), once: the rows go back to the identity after."""
    from tests.tiny_decode import tiny_model_two_states

    model, tok, ref, got = tiny_model_two_states(max_len=5)
    with torch.no_grad():
        for st in (ref, got):
            model.decode_one_token(st, tok)  # a step, so the self caches' rows differ
        rows = torch.empty(4, dtype=torch.long)
        got.defer_reorder(rows)
        assert torch.equal(rows, torch.arange(4))
        rows.copy_(torch.tensor([2, 2, 0, 3]))
        ref.reorder(rows.clone(), cross=False)
        want = model.decode_one_token(ref, tok)
        out = model.decode_one_token(got, tok)
        assert torch.equal(out, want)
        assert torch.equal(got.self_kv, ref.self_kv)
        assert torch.equal(rows, torch.arange(4))  # applied once
        assert torch.equal(model.decode_one_token(got, tok), model.decode_one_token(ref, tok))


BUFFERS = ("tok", "scores", "seqs", "fin_scores", "fin_seqs", "fin_len", "done", "ended", "t", "src")


@pytest.mark.parametrize("seed,B,nb,V,steps,eos_boost,grid,lp,same", [
    (1, 3, 4, 9, 10, 3.0, 0, 1.0, False),
    (3, 2, 3, 13, 9, 1.5, 1, 0.6, False),   # another length penalty, nb not a power of two
    (7, 2, 4, 6, 9, 2.5, 1, 1.0, True),     # tied kept hypotheses
    (6, 2, 3, 4, 8, 2.0, 2, 1.0, True),
    (5, 2, 1, 8, 5, 3.0, 0, 1.0, False),    # one beam
    (4, 1, 2, 7, 300, 0.5, 0, 1.0, False),  # more columns than one block of the kernel
])
def test_beam_kernel_equals_the_tensor_ops(seed, B, nb, V, steps, eos_boost, grid, lp, same):
    """kernels/beam_select.py (interpreted here) leaves every BeamSelect buffer as the tensor-op update does, bitwise,
    after every step, and so returns the same hypotheses (the candidates by the tensor ops in both)."""
    logits = _logits(seed, steps, B, nb, V, eos_boost, grid, same)
    ops = BeamSelect(B, nb, steps, "cpu", START, PAD, EOS, lp, kernel=False)
    ker = BeamSelect(B, nb, steps, "cpu", START, PAD, EOS, lp, kernel=True, topk=False)
    assert not ker.topk_kernel
    for x in logits:
        ops(x)
        ker(x)
        for name in BUFFERS:
            assert torch.equal(getattr(ker, name), getattr(ops, name)), name
    assert torch.equal(ker.result(steps), ops.result(steps))
    assert (ops.fin_scores > -float("inf")).any()


@pytest.mark.parametrize("seed,B,nb,V,steps,eos_boost,lp", [
    (1, 3, 4, 9, 10, 3.0, 1.0),
    (3, 2, 3, 13, 9, 1.5, 0.6),
    (5, 2, 1, 8, 5, 3.0, 1.0),
    (4, 1, 2, 7, 300, 0.5, 1.0),
    (8, 2, 4, 1500, 12, 7.0, 1.0),  # two of the candidates kernels' tiles per row
])
def test_beam_candidates_kernels_choose_as_the_tensor_ops(seed, B, nb, V, steps, eos_boost, lp):
    """With kernels/beam_topk.py's candidates (the default wherever the update kernel runs) every step makes the
    tensor form's choices on logits without near-ties: the same tokens, sequences, kept hypotheses and cache rows;
    the scores equal to float32 rounding (the log-sum-exp sums in another order)."""
    logits = _logits(seed, steps, B, nb, V, eos_boost, 0, False)
    ops = BeamSelect(B, nb, steps, "cpu", START, PAD, EOS, lp, kernel=False)
    ker = BeamSelect(B, nb, steps, "cpu", START, PAD, EOS, lp, kernel=True)
    assert ker.topk_kernel and not ops.topk_kernel
    for x in logits:
        ops(x)
        ker(x)
        for name in BUFFERS:
            a, b = getattr(ker, name), getattr(ops, name)
            if name in ("scores", "fin_scores"):
                assert torch.allclose(a, b, rtol=1e-6, atol=1e-5), name
            else:
                assert torch.equal(a, b), name
    assert torch.equal(ker.result(steps), ops.result(steps))
    assert (ops.fin_scores > -float("inf")).any()


def test_beam_kernel_default(monkeypatch):
    """The update kernel is the default on CUDA only; PGMOE_BEAM_KERNEL=0 turns it off, =1 asks for it on the CPU,
    where it runs under Triton's interpreter only; kernel= overrides both."""
    def made(**kw):
        return BeamSelect(1, 2, 3, "cpu", START, PAD, EOS, **kw).kernel

    monkeypatch.delenv("PGMOE_BEAM_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not made()
    monkeypatch.setenv("PGMOE_BEAM_KERNEL", "1")
    assert not made()  # no GPU, no interpreter: the tensor ops
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert made() and not made(kernel=False)
    monkeypatch.setenv("PGMOE_BEAM_KERNEL", "0")
    assert not made() and made(kernel=True)
    # the candidates' kernels go with the update kernel unless PGMOE_BEAM_TOPK=0
    assert BeamSelect(1, 2, 3, "cpu", START, PAD, EOS, kernel=True).topk_kernel
    assert not BeamSelect(1, 2, 3, "cpu", START, PAD, EOS, kernel=False).topk_kernel
    monkeypatch.setenv("PGMOE_BEAM_TOPK", "0")
    assert not BeamSelect(1, 2, 3, "cpu", START, PAD, EOS, kernel=True).topk_kernel
    assert BeamSelect(1, 2, 3, "cpu", START, PAD, EOS, kernel=True, topk=True).topk_kernel
