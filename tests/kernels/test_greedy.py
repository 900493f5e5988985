"""The greedy-choice kernel (interpreter, CPU) against its PyTorch reference: the same tokens, output columns,
done and ended flags and step counter, bitwise, over random logits with ties, NaN, -inf rows, rows that already
ended, EOS hits and the output column wrapping."""

import pytest
import torch

pytest.importorskip("triton")

from kernels import greedy  # noqa: E402


def _state(B, n, seed, t0=0, done=None):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 50, (B,), generator=g)
    out = torch.randint(0, 50, (B, n), generator=g)
    d = torch.zeros(B, dtype=torch.bool) if done is None else torch.tensor(done)
    ended = torch.rand(n, generator=g) < 0.5
    return [tok, out, d, ended, torch.tensor(t0)]


def _both(logits, state, pad, eos):
    a = [x.clone() for x in state]
    b = [x.clone() for x in state]
    greedy.greedy_select(logits, *a, pad, eos, force_triton=True)
    greedy.greedy_select_reference(logits, *b, pad, eos)
    return a, b


@pytest.mark.parametrize("B,V,block", [(1, 300, None), (3, 300, None), (2, 1000, 128), (1, 77, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(B, V, block, dtype, monkeypatch):
    if block:  # several chunks of the vocabulary per row
        monkeypatch.setattr(greedy, "MAX_BLOCK_V", block)
    n = 5
    for seed in range(6):
        g = torch.Generator().manual_seed(100 + seed)
        logits = torch.randn(B, V, generator=g).to(dtype)
        if seed == 1:  # ties: the maximum twice in each row (the first index wins)
            logits[:, V // 3] = logits[:, 2 * V // 3] = 50
        if seed == 2:  # a NaN after the maximum counts as larger
            logits[:, 0] = 60
            logits[:, V - 2] = float("nan")
        if seed == 3:  # a row of -inf
            logits[0] = float("-inf")
        if seed == 4:  # EOS is the argmax of row 0
            logits[0, 7] = 100
        done = [bool(i % 2) for i in range(B)] if seed == 5 else None
        state = _state(B, n, seed, t0=seed * 3, done=done)  # t past n: the column wraps
        a, b = _both(logits, state, pad=1, eos=7)
        for name, x, y in zip(("tok", "out", "done", "ended", "t"), a, b):
            assert torch.equal(x, y), (seed, name, x, y)
        assert int(a[4]) == seed * 3 + 1


def test_ended_needs_every_row():
    logits = torch.full((3, 20), -1.0)
    logits[:, 4] = 5.0  # every row picks 4 (= eos)
    state = _state(3, 4, 0, done=[False, False, False])
    a, _ = _both(logits, state, pad=0, eos=4)
    assert a[2].all() and bool(a[3][0])
    logits[1, 4] = -9.0  # row 1 picks another token: not every row ended
    state = _state(3, 4, 0, done=[False, False, False])
    a, b = _both(logits, state, pad=0, eos=4)
    assert not bool(a[3][0]) and torch.equal(a[3], b[3])


def test_bad_buffers():
    logits = torch.randn(2, 10)
    tok, out, done, ended, t = _state(2, 4, 0)
    with pytest.raises(ValueError, match="done must be"):
        greedy.greedy_select(logits, tok, out, done.long(), ended, t, 0, 1, force_triton=True)
    with pytest.raises(ValueError, match="tok"):
        greedy.greedy_select(logits, tok[:1], out, done, ended, t, 0, 1, force_triton=True)


@pytest.mark.parametrize("force", [True, False])
def test_early_guess_for_the_host(force):
    """early: after each choice the host buffer holds (seq, table[token]), seq advancing by one per step, in the kernel
    (interpreted) and the reference alike; more than one row is refused."""
    g = torch.Generator().manual_seed(5)
    V = 300
    table = torch.randint(-1, 16, (V, 1), generator=g, dtype=torch.int32)
    early = greedy.EarlyGuess(table, torch.zeros(2, dtype=torch.int64), torch.full((1,), 40, dtype=torch.int64))
    tok, out = torch.zeros(1, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
    done = torch.zeros(1, dtype=torch.bool)
    ended, t = torch.zeros(4, dtype=torch.bool), torch.zeros((), dtype=torch.long)
    for step in range(3):
        logits = torch.randn(1, V, generator=g)
        greedy.greedy_select(logits, tok, out, done, ended, t, 0, V + 5, force_triton=force, early=early)
        x = int(logits.argmax())
        assert int(tok[0]) == x
        assert early.out.tolist() == [41 + step, int(table[x, 0])] and int(early.seq[0]) == 41 + step
    with pytest.raises(ValueError, match="one row"):
        greedy.greedy_select(torch.randn(2, V), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long),
                             torch.zeros(2, dtype=torch.bool), ended, t, 0, 1, force_triton=force, early=early)
