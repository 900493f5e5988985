"""plan_slots: the one-kernel slot plan equals its reference bitwise (Triton interpreter on CPU), and the
reference equals OffloadRunner._plan."""

import pytest
import torch

pytest.importorskip("triton")

from kernels.slot_plan import (  # noqa: E402
    INF_KEY,
    LAST_KEY,
    STATE_NAMES,
    plan_slots,
    plan_slots_reference,
    random_state,
)

# the kernel's device: the CPU, as tests/kernels/conftest.py runs Triton's interpreter on every machine (on a GPU
# machine too: there the compiled kernel is checked by kernels.slot_plan.self_check, which scripts/bench_e2e.py runs)
DEV = "cpu"

STATE = STATE_NAMES
_state = random_state  # a random reachable state (CPU tensors)


def _ids(kind: str, st: dict, E: int, n: int, g: torch.Generator) -> torch.Tensor:
    resident = st["holder_K"][st["holder_K"] >= 0]
    if kind == "none":
        return torch.zeros(0, dtype=torch.long)
    if kind == "hits":  # resident experts only: no miss
        return resident[torch.randint(0, max(resident.numel(), 1), (3,), generator=g)] if resident.numel() else \
            torch.zeros(0, dtype=torch.long)
    if kind == "all":
        return torch.arange(E).flip(0)
    if kind == "over":  # more misses than n where E allows
        return torch.randperm(E, generator=g)[: min(E, 2 * n + 1)]
    return torch.randint(0, E, (max(1, n // 2), 2), generator=g)  # k = 2, repeats


KINDS = ["random", "none", "over", "hits", "all", "random"]


@pytest.mark.parametrize("cache_kind", ["lru", "lfu"])
@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("C", [0, 4, 32])
@pytest.mark.parametrize("E", [8, 128])
def test_kernel_matches_reference_over_steps(E, C, n, cache_kind):
    n = min(n, E)
    g = torch.Generator().manual_seed(E * 1000 + C * 10 + n + (cache_kind == "lfu"))
    nmax = n + int(torch.randint(0, 3, (), generator=g))
    ref = _state(E, C, nmax, g)
    ker = {k: v.clone().to(DEV) for k, v in ref.items()}
    for step, kind in enumerate(KINDS):
        ids = _ids(kind, ref, E, n, g)
        fresh = bool(torch.rand((), generator=g) < 0.5) if step else True
        use_ids = step % 2 == 1
        if use_ids and step % 4 == 3:  # ids < 0 name no expert (a guess not made)
            ids = torch.where(torch.rand(ids.shape, generator=g) < 0.3, -1, ids)
        if not use_ids:
            ref["need_E"].zero_().index_fill_(0, ids.reshape(-1), True)
            ker["need_E"].copy_(ref["need_E"])
        kw = dict(C=C, n=n, cache_kind=cache_kind, fresh=fresh,
                  ids=ids.to(torch.int32 if step % 4 == 1 else torch.int64) if use_ids else None)
        src_r, dst_r = plan_slots_reference(*(ref[k] for k in STATE), **kw)
        if use_ids:
            kw["ids"] = kw["ids"].to(DEV)
        src_k, dst_k = plan_slots(*(ker[k] for k in STATE), impl="triton", **kw)
        for k in STATE:
            assert torch.equal(ref[k], ker[k].cpu()), (step, kind, k, ref[k], ker[k])
        assert torch.equal(src_r, src_k.cpu()) and torch.equal(dst_r, dst_k.cpu())
        need = int(ref["need_E"].sum())
        assert int((src_r >= 0).sum()) <= min(n, need)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("C", [0, 4])
def test_lookup_plan_matches_ids_plan(C, k):
    """lookup=(table, tokens, out): the plan looks the ids up itself (ids = table[tokens], -1 entries naming none),
    writes them to out, and plans exactly as with those ids handed in; kernel and reference alike."""
    E, n = 16, 4
    g = torch.Generator().manual_seed(7 + C + k)
    base = _state(E, C, n + 1, g)
    table = torch.randint(-1, E, (40, k), generator=g, dtype=torch.int32)
    tokens = torch.randint(0, 40, (5,), generator=g)
    want = table[tokens]
    with_ids = {kk: v.clone() for kk, v in base.items()}
    src_w, dst_w = plan_slots_reference(*(with_ids[s] for s in STATE), C=C, n=n, ids=want)
    for impl in ("reference", "triton"):
        st = {kk: v.clone().to(DEV) for kk, v in base.items()}
        out = torch.full((5, k), -7, dtype=torch.int32)
        src, dst = plan_slots(*(st[s] for s in STATE), C=C, n=n, lookup=(table, tokens, out), impl=impl)
        assert torch.equal(out, want), impl
        assert torch.equal(src, src_w) and torch.equal(dst, dst_w), impl
        for s in STATE:
            assert torch.equal(st[s], with_ids[s]), (impl, s)
    with pytest.raises(ValueError, match="exclusive"):
        plan_slots(*(base[s] for s in STATE), C=C, n=n, ids=want, lookup=(table, tokens, out))
    with pytest.raises(ValueError, match="out must be"):
        plan_slots(*(base[s] for s in STATE), C=C, n=n, lookup=(table, tokens, out[:, :1].clone() if k == 2
                                                                   else torch.empty(5, 2, dtype=torch.int32)))


def test_plan_details():
    """Misses by expert id, the first n only; victims: empty/oldest cache slots, then staging in order."""
    E, C, nmax = 8, 3, 2
    for impl in ("reference", "triton"):
        st = _state(E, C, nmax, torch.Generator().manual_seed(0))
        st["holder_K"].copy_(torch.tensor([5, -1, 2, 7, -1]))
        st["last_use_C"].copy_(torch.tensor([3, -1, 1]))
        st["cand_slot_K"].copy_(torch.tensor([10, 11, 12, 20, 21]))
        st["need_E"].zero_()[[0, 2, 4, 6]] = True  # 2 is a hit; misses 0, 4, 6: 0 and 4 copied
        st["hits"].zero_(), st["lookups"].zero_(), st["copied"].zero_(), st["tick"].fill_(9)
        src, dst = plan_slots(*(st[k] for k in STATE), C=C, n=2, fresh=True, impl=impl)
        assert src.tolist() == [0, 4] and dst.tolist() == [11, 10]  # the empty slot, then last use 3
        assert st["holder_K"].tolist() == [4, 0, 2, -1, -1]
        assert st["table_E"][[0, 2, 4]].tolist() == [11, 12, 10]
        assert st["last_use_C"].tolist() == [9, 9, 9] and int(st["tick"]) == 10
        assert [int(st[k]) for k in ("hits", "lookups", "copied")] == [1, 4, 2]


def test_sentinels_and_errors():
    assert LAST_KEY < INF_KEY  # a staging slot is taken before one holding a needed expert (never)
    st = _state(8, 2, 2, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="n <= K - C"):
        plan_slots(*(st[k] for k in STATE), C=2, n=3)
    with pytest.raises(ValueError, match="cache_kind"):
        plan_slots(*(st[k] for k in STATE), C=2, n=1, cache_kind="fifo")


@pytest.fixture(scope="module")
def runner_model(tmp_path_factory):
    from infer.engine import load_offloaded
    from tests.infer.util import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory.mktemp("ck") / "pregated", pregated=True)
    return load_offloaded(path, "cpu", torch.float32, None)


@pytest.mark.parametrize("spec", ["pregated@lru2", "pregated@lfu3", "on_demand", "speculative@lru5"])
def test_reference_matches_offload_runner(runner_model, spec):
    from infer.policies import OffloadRunner, PolicySpec

    model, store = runner_model
    r = OffloadRunner(model, store, PolicySpec.parse(spec), "cpu", n_enc=6, n_dec=3)
    r.pool.skip_copies = True
    g = torch.Generator().manual_seed(len(spec))
    E, C = r.E, r.C
    for step in range(12):
        m = int(torch.randint(0, store.M, (), generator=g))
        need = torch.zeros(E, dtype=torch.bool)
        need[torch.randint(0, E, (int(torch.randint(0, 5, (), generator=g)),), generator=g)] = True
        fresh = bool(step % 3)
        n = r.n_of[r.stack_of[m]]
        st = dict(need_E=need.clone(), holder_K=r.holder[m].clone(), cand_slot_K=r.cand_slot[m].clone(),
                  table_E=r.table[m].clone(), last_use_C=r.last_use[m].clone(), freq_E=r.freq[m].clone(),
                  tick=r.tick.clone(), hits=r.hits.clone(), lookups=r.lookups.clone(), copied=r.copied.clone(),
                  plan_src=r.plan_src[m].clone(), plan_dst=r.plan_dst[m].clone())
        plan_slots_reference(*(st[k] for k in STATE), C=C, n=n, cache_kind=r.spec.cache_kind, fresh=fresh)
        r._plan(m, need, fresh)
        got = dict(holder_K=r.holder[m], table_E=r.table[m], last_use_C=r.last_use[m], freq_E=r.freq[m],
                   tick=r.tick, hits=r.hits, lookups=r.lookups, copied=r.copied, plan_src=r.plan_src[m],
                   plan_dst=r.plan_dst[m])
        for k, v in got.items():
            assert torch.equal(st[k], v), (spec, step, k)
    assert int(r.lookups) > 0


def test_dispatch(monkeypatch):
    import kernels.slot_plan as sp

    def no_reference(*a, **k):
        raise AssertionError("reference called")

    monkeypatch.setattr(sp, "plan_slots_reference", no_reference)
    st = _state(8, 2, 2, torch.Generator().manual_seed(2))
    monkeypatch.setenv("PGMOE_FORCE_TRITON", "1")
    sp.plan_slots(*(st[k] for k in STATE), C=2, n=2, impl="auto")  # the kernel under the interpreter
    # the default (no impl named) is DEFAULT_IMPL: the reference until the kernel is measured on a GPU
    monkeypatch.setattr(sp, "DEFAULT_IMPL", "reference")
    with pytest.raises(AssertionError, match="reference called"):
        sp.plan_slots(*(st[k] for k in STATE), C=2, n=2)
    monkeypatch.setattr(sp, "DEFAULT_IMPL", "auto")
    sp.plan_slots(*(st[k] for k in STATE), C=2, n=2)
    monkeypatch.delenv("PGMOE_FORCE_TRITON")
    with pytest.raises(AssertionError, match="reference called"):
        sp.plan_slots(*(st[k] for k in STATE), C=2, n=2, impl="auto")


def test_self_check_passes_and_can_fail(monkeypatch):
    """The benchmarks' pre-check (kernels.slot_plan.self_check) passes on the kernel and reports a broken one."""
    import kernels.slot_plan as sp

    monkeypatch.setenv("PGMOE_FORCE_TRITON", "1")
    assert sp.self_check(DEV) is None
    real = sp.plan_slots_reference

    def off_by_one(*a, **kw):
        src, dst = real(*a, **kw)
        kw_tick = a[6]
        kw_tick.add_(1)
        return src, dst

    monkeypatch.setattr(sp, "plan_slots_reference", off_by_one)
    msg = sp.self_check(DEV)
    assert msg is not None and "tick" in msg
