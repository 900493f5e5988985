"""Stall by difference (graph steps): the no-copy switch and the measurement's bookkeeping, on the CPU.
The timing itself needs a GPU (CUDA events around graph replays); here only the logic is checked."""

import pytest
import torch

from infer.engine import Engine, load_offloaded, stall_by_difference
from infer.policies import OffloadRunner, PolicySpec
from tests.infer.util import prompts, tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "pregated", pregated=True)


def _setup(ckpt, spec):
    model, store = load_offloaded(ckpt, "cpu", torch.float32, None)
    ids, mask = prompts()
    B, S = ids.shape
    runner = OffloadRunner(model, store, spec, "cpu", n_enc=B * S, n_dec=B).attach()
    state = model.prefill(ids, mask, max_len=6)
    return model, runner, state, torch.zeros(B, dtype=torch.long)


def _counters(runner):
    return [int(t) for t in runner._counters()]


SPECS = [PolicySpec("pregated", 2, "lru"), PolicySpec("on_demand"), PolicySpec("prefetch_all")]


@pytest.mark.parametrize("spec", SPECS)
def test_no_copies_switch(ckpt, spec):
    model, runner, state, tok = _setup(ckpt, spec)
    pool = runner.pool
    model.decode_one_token(state, tok)  # one ordinary step: copies
    before_pool, before = pool.pool.clone(), _counters(runner)
    before_state = [t.clone() for t in runner.save_state()]
    assert not pool.skip_copies
    with runner.no_copies():
        assert pool.skip_copies
        for _ in range(2):
            model.decode_one_token(state, tok)
        assert torch.equal(pool.pool, before_pool)  # nothing copied
        assert _counters(runner)[2] > before[2]  # but the plans ran (lookups counted, tables updated)
    assert not pool.skip_copies  # off again
    assert _counters(runner) == before  # counters back
    assert all(torch.equal(a, b) for a, b in zip(runner.save_state(), before_state))  # placement back
    model.decode_one_token(state, tok)  # copies again (with a cache the step may also hit everything)
    after = _counters(runner)
    assert after[0] > before[0] if spec.cache_size == 0 else after[0] + after[1] > before[0] + before[1]
    runner.detach()


def test_no_copies_flag_off_after_an_error(ckpt):
    _, runner, _, _ = _setup(ckpt, PolicySpec("on_demand"))
    before = _counters(runner)
    with pytest.raises(RuntimeError):
        with runner.no_copies():
            runner.copied.add_(5)
            raise RuntimeError("boom")
    assert not runner.pool.skip_copies and _counters(runner) == before
    runner.detach()


def test_stall_by_difference_bookkeeping(ckpt):
    """With eager steps standing in for the two graphs: both passes run, the runner's counters,
    placement and state.pos are restored, the no-copy variant is built under the flag."""
    model, runner, state, tok = _setup(ckpt, PolicySpec("pregated", 2, "lfu"))
    inputs = []
    for _ in range(3):
        inputs.append((tok.clone(), state.pos.clone()))
        model.decode_one_token(state, tok)
    saved, pos = [t.clone() for t in runner.save_state()], state.pos.clone()
    flags = []

    def make_without():
        flags.append(runner.pool.skip_copies)
        return model.decode_one_token

    m = stall_by_difference(runner, state, model.decode_one_token, make_without, inputs, torch.device("cpu"), replays=5)
    assert flags == [True] and not runner.pool.skip_copies
    assert m["stall_ms_per_token"] >= 0.0
    assert m["step_ms_median_with_copies"] > 0 and m["step_ms_median_without_copies"] > 0
    assert "difference" in m["stall_method"]
    assert torch.equal(state.pos, pos)
    assert all(torch.equal(a, b) for a, b in zip(runner.save_state(), saved))
    runner.detach()


def test_cpu_run_with_measure_stall_unchanged(ckpt):
    """On the CPU nothing is captured: no stall figure, and the outputs are gpu_only's, bitwise."""
    model, store = load_offloaded(ckpt, "cpu", torch.float32, None)
    ids, mask = prompts()
    kw = dict(max_new_tokens=5, keep_logits=True)
    ref = Engine(model, store, "cpu").run(PolicySpec("gpu_only"), ids, mask, **kw)
    eng = Engine(model, store, "cpu", measure_stall=True, measure_copy=True)
    res = eng.run(PolicySpec("pregated", 2), ids, mask, **kw)
    assert res.tokens == ref.tokens
    assert all(torch.equal(a, b) for a, b in zip(ref.step_logits, res.step_logits))
    m = res.metrics
    assert m["stall_ms"] is None and m["stall_ms_per_token"] is None and m["stall_method"] is None
    assert m["copy_kernel"] is None  # copy timing needs CUDA events


class _Ev:
    """A stand-in CUDA event at a fixed time (ms)."""

    def __init__(self, t):
        self.t = t

    def elapsed_time(self, other):
        return other.t - self.t


def test_dma_timeline_places_each_plan_in_its_step():
    from infer.engine import dma_timeline

    # two steps of 2 ms; per step two plans (blocks 1, 2): copies at +0.3-0.5 and +0.6-1.1
    steps = [(_Ev(10.0), _Ev(12.0)), (_Ev(20.0), _Ev(22.0))]
    trace = []
    for base, g in ((10.0, 1), (20.0, 3)):
        trace += [(g, 1, _Ev(base + 0.3), _Ev(base + 0.5)), (g + 1, 2, _Ev(base + 0.6), _Ev(base + 1.1))]
    tl = dma_timeline(steps, trace)
    assert tl["blocks"] == [1, 2] and tl["steps"] == 2 and tl["step_ms"] == pytest.approx(2.0)
    assert tl["copy_start_ms"] == pytest.approx([0.3, 0.6]) and tl["copy_end_ms"] == pytest.approx([0.5, 1.1])
    assert tl["idle_before_ms"] == pytest.approx([0.3, 0.1])
    assert "error" in dma_timeline(steps, trace[:3])  # a step with a plan missing: no timeline
    assert "experts_per_plan" not in tl  # (a trace without counts)
    counted = [(*t, n) for t, n in zip(trace, (1, 0, 1, 2))]  # (g, block, start, end, experts copied)
    assert dma_timeline(steps, counted)["experts_per_plan"] == [1.0, 1.0]


def test_stall_replays_of_beam_steps_follow_the_run(ckpt):
    """Beam search: with restart=BeamSelect.reset, the replays of the recorded first steps choose exactly the beams
    the run chose (each replay's next tokens are the next recorded input), so they route and copy as the run did;
    the select's calls stand in for the captured graph's. Without the reset the recorded tokens would meet the caches
of other beams (the run's last order, then each replay's reorder)."""
    from models.generate import BeamSelect

    model, store = load_offloaded(ckpt, "cpu", torch.float32, None)
    ids, mask = prompts()
    B, S = ids.shape
    nb = 3
    runner = OffloadRunner(model, store, PolicySpec("pregated", 2, "lfu"), "cpu", n_enc=B * nb * S,
                           n_dec=B * nb).attach()
    state = model.prefill(ids.repeat_interleave(nb, 0), mask.repeat_interleave(nb, 0), max_len=6)
    cfg = model.cfg
    sel = BeamSelect(B, nb, 6, "cpu", cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id, state=state)
    inputs = []
    for _ in range(5):  # the run: its inputs recorded as the engine records them
        inputs.append((sel.tok.clone(), state.pos.clone()))
        sel(model.decode_one_token(state, sel.tok))
    followed = []

    def step(st, tok):  # what the captured graph does: the step, then the select (which writes sel.tok)
        sel.tok.copy_(tok)
        sel(model.decode_one_token(st, sel.tok))
        nxt = [i for i, (t, p) in enumerate(inputs) if torch.equal(p, st.pos - 1)]
        # (the pass without copies computes with whatever the slots hold: only its time counts, not its choices)
        if nxt and nxt[0] + 1 < len(inputs) and not runner.pool.skip_copies:
            followed.append(torch.equal(sel.tok, inputs[nxt[0] + 1][0]))

    m = stall_by_difference(runner, state, step, lambda: step, inputs, torch.device("cpu"), replays=8,
                            restart=sel.reset)
    assert m["stall_ms_per_token"] >= 0.0
    assert len(followed) == 7 and all(followed)  # 8 replays of 5 steps: 4 + 3 with a next input to compare
    # replays=None with a restart: each pass replays the run's recorded steps once, in order (the medians cover the
    # run's own steps), and they still follow the run
    followed.clear()
    m = stall_by_difference(runner, state, step, lambda: step, inputs, torch.device("cpu"), restart=sel.reset)
    assert "the run's 5 recorded steps" in m["stall_method"]
    assert len(followed) == 4 and all(followed)
    runner.detach()
