"""Contract 3: offloading never changes the answer (bitwise on one device), and clear errors."""

import os
from dataclasses import asdict

import pytest
import torch

from infer.engine import Engine, load_offloaded
from infer.offload import CopySettings, ExpertStore, OffloadError, PackFailed
from infer.policies import OffloadRunner, PolicySpec
from tests.infer.util import prompts, tiny_checkpoint

CPU_POLICIES = ["on_demand", "prefetch_all", "pregated"]
CACHES = [(0, "lru"), (2, "lru"), (3, "lfu"), (8, "lru")]


@pytest.fixture(scope="module")
def pregated_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "pregated", pregated=True)


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "plain", pregated=False)


def _engine(path):
    model, store = load_offloaded(path, "cpu", torch.float32, None)
    return Engine(model, store, "cpu")


def _native_or_skip(api: str) -> None:
    """Skip where the dma copier's native loop is asked for and cannot be built here (no C compiler)."""
    from infer import native_copier

    if api == "native":
        try:
            native_copier.build()
        except native_copier.NativeUnavailable as e:
            pytest.skip(str(e))


def _same(ref, res):
    assert res.tokens == ref.tokens, res.policy
    assert len(res.step_logits) == len(ref.step_logits)
    for a, b in zip(ref.step_logits, res.step_logits):
        assert torch.equal(a, b), res.policy


@pytest.mark.parametrize("num_beams", [1, 3])
def test_every_policy_and_cache_matches_gpu_only(pregated_ckpt, num_beams):
    eng = _engine(pregated_ckpt)
    ids, mask = prompts()
    kw = dict(max_new_tokens=6, num_beams=num_beams, keep_logits=True)
    ref = eng.run(PolicySpec("gpu_only"), ids, mask, **kw)
    assert ref.step_logits
    for name in CPU_POLICIES:
        for size, kind in CACHES:
            res = eng.run(PolicySpec(name, size, kind), ids, mask, **kw)
            _same(ref, res)
            m = res.metrics
            assert m["experts_copied"] > 0 and m["expert_lookups"] > 0
            assert m["peak_allocated_bytes"] is None  # CPU: no GPU figures invented


def test_cache_hits_and_fewer_copies(pregated_ckpt):
    eng = _engine(pregated_ckpt)
    ids, mask = prompts()
    plain = eng.run(PolicySpec("on_demand"), ids, mask, max_new_tokens=8).metrics
    cached = eng.run(PolicySpec("on_demand", 8, "lru"), ids, mask, max_new_tokens=8).metrics
    assert plain["hit_rate"] == 0.0
    assert cached["hit_rate"] > 0.5  # 8 slots hold all 8 experts of a block after the first misses
    assert cached["experts_copied"] <= 4 * 8  # at most every expert of every block once
    assert cached["experts_copied"] < plain["experts_copied"]
    lfu = eng.run(PolicySpec("on_demand", 2, "lfu"), ids, mask, max_new_tokens=8).metrics
    assert 0.0 <= lfu["hit_rate"] <= 1.0


def test_speculative_on_unconverted_model(plain_ckpt):
    eng = _engine(plain_ckpt)
    ids, mask = prompts()
    kw = dict(max_new_tokens=6, keep_logits=True)
    ref = eng.run(PolicySpec("gpu_only"), ids, mask, **kw)
    for size in (0, 2):
        _same(ref, eng.run(PolicySpec("speculative", size), ids, mask, **kw))
    _same(ref, eng.run(PolicySpec("on_demand"), ids, mask, **kw))


def test_lookahead_policy(tmp_path):
    path = tiny_checkpoint(
        tmp_path / "la",
        lookahead=2,
        num_layers=8,
        num_decoder_layers=8,
        num_sparse_encoder_layers=4,
        num_sparse_decoder_layers=4,
    )
    eng = _engine(path)
    ids, mask = prompts()
    kw = dict(max_new_tokens=5, keep_logits=True)
    ref = eng.run(PolicySpec("gpu_only"), ids, mask, **kw)
    for spec in (PolicySpec("lookahead"), PolicySpec("lookahead", 2), PolicySpec("on_demand")):
        _same(ref, eng.run(spec, ids, mask, **kw))
    with pytest.raises(OffloadError, match="lookahead"):
        eng.run(PolicySpec("pregated"), ids, mask, **kw)


def test_pregated_refuses_unconverted_model(plain_ckpt):
    eng = _engine(plain_ckpt)
    ids, mask = prompts()
    with pytest.raises(OffloadError, match="needs a pre-gated model"):
        eng.run(PolicySpec("pregated"), ids, mask, max_new_tokens=2)


def test_budget_exceeded_fails_at_load(pregated_ckpt):
    with pytest.raises(OffloadError, match=r"pinned_budget_gb.*") as e:
        load_offloaded(pregated_ckpt, "cpu", torch.float32, budget_bytes=1000)
    assert "MoE blocks" in str(e.value) and "GB" in str(e.value)


def test_policy_spec_parsing():
    assert PolicySpec.parse("on_demand@lru4") == PolicySpec("on_demand", 4, "lru")
    assert PolicySpec.parse("pregated", 2, "lfu").label == "pregated@lfu2"
    for bad in ("nope", "on_demand@xyz3", "gpu_only@lru2"):
        with pytest.raises(OffloadError):
            PolicySpec.parse(bad)


def test_slots_stay_bounded(pregated_ckpt):
    model, store = load_offloaded(pregated_ckpt, "cpu", torch.float32, None)
    r = OffloadRunner(model, store, PolicySpec("pregated"), "cpu", n_enc=1000, n_dec=1)
    # decode: 2 blocks x 1 row; prefill: one chunk of all 8 experts, in the same slots
    assert r.pool.P == max(2 * 1, store.E)
    r = OffloadRunner(model, store, PolicySpec("prefetch_all"), "cpu", n_enc=1000, n_dec=1)
    assert r.pool.P == 2 * store.E  # prefetch_all needs every expert of two blocks anyway


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "wide", num_experts=32)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_pool_does_not_scale_with_experts_for_the_prefill(wide_ckpt, num_beams):
    """E = 32: the encoder's blocks stream their experts through prefill_slots slots (in chunks, two
    buffers); the pool holds the decode step's slots (2 blocks x rows x k) + those + the cache, and
    every policy still gives gpu_only's tokens and bitwise-equal logits."""
    model, store = load_offloaded(wide_ckpt, "cpu", torch.float32, None)
    assert store.E == 32
    ids, mask = prompts()
    rows, k = ids.shape[0] * num_beams, 1
    kw = dict(max_new_tokens=5, num_beams=num_beams, keep_logits=True)
    ref = Engine(model, store, "cpu").run(PolicySpec("gpu_only"), ids, mask, **kw)
    for prefill_slots in (1, 4, 5, 16):
        eng = Engine(model, store, "cpu", prefill_slots=prefill_slots)
        for spec in (PolicySpec("pregated"), PolicySpec("on_demand", 2, "lru"), PolicySpec("pregated", 3, "lfu")):
            res = eng.run(spec, ids, mask, **kw)
            _same(ref, res)
            m = res.metrics
            cache = store.M * spec.cache_size
            bound = (max(2 * rows * k, prefill_slots) + cache) * store.expert_bytes
            assert m["pool_bytes"] <= bound < 2 * store.E * store.expert_bytes, (prefill_slots, spec)
            # staging and the prefill region share their slots
            assert m["pool_bytes"] == m["pool_cache_bytes"] + max(m["pool_staging_bytes"], m["pool_prefill_bytes"])
            assert m["pool_slots"]["shared"] == min(m["pool_slots"]["decode_staging"], m["pool_slots"]["prefill"])
            assert m["pool_slots"]["prefill"] <= prefill_slots
            assert m["pool_slots"]["decode_staging"] == 2 * rows * k
            # every expert the encoder needs is copied once, through the prefill slots
            assert m["experts_copied"] > 0 and m["expert_lookups"] >= m["experts_copied"] - 0


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_gpu_path_under_the_interpreter(pregated_ckpt, monkeypatch, backend):
    """The GPU path's pieces on the CPU: the device copy kernel (ids with -1 = skip) into the [P, X] pool,
    and (slow: PGMOE_SLOW_TESTS=1) the Triton expert FFN reading w_in/w_out through the pool's strided
    views and the slot table."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if backend == "triton":
        monkeypatch.setenv("PGMOE_FORCE_TRITON", "1")
    model, store = load_offloaded(pregated_ckpt, "cpu", torch.float32, None)
    model.set_backend(backend)
    ids, mask = prompts(n=2, length=5)
    kw = dict(max_new_tokens=2, keep_logits=True)
    ref = Engine(model, store, "cpu").run(PolicySpec("gpu_only"), ids, mask, **kw)
    # the default copy grid, and a small one (2 programs of 256 elements, 1 warp: many iterations per row)
    for spec, copy in ((PolicySpec("pregated", 2, "lru"), None),
                       (PolicySpec("on_demand"), CopySettings("high", programs=2, block=256, warps=1))):
        res = Engine(model, store, "cpu", copy_mode="device", copy=copy).run(spec, ids, mask, **kw)
        assert res.metrics["copy_mode"] == "device"
        assert res.metrics["copy_settings"] == asdict(copy or CopySettings())
        assert res.tokens == ref.tokens
        for a, b in zip(ref.step_logits, res.step_logits):
            assert torch.equal(a, b)


def _dma_case(path, monkeypatch, api: str, rows: int, new_tokens: int):
    """A copy_mode dma case on the CPU (the kernels under the interpreter; skipped where the asked loop cannot be
    built): the fp32 model and store, a prompt of `rows` rows, the run settings and gpu_only's run of them."""
    _native_or_skip(api)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, store = load_offloaded(path, "cpu", torch.float32, None)
    model.set_backend("torch")
    ids, mask = prompts(n=rows, length=5)
    kw = dict(max_new_tokens=new_tokens, keep_logits=True)
    return model, store, ids, mask, kw, Engine(model, store, "cpu").run(PolicySpec("gpu_only"), ids, mask, **kw)


@pytest.mark.parametrize("api", ["native", "torch"])
def test_dma_copy_mode_under_the_interpreter(pregated_ckpt, monkeypatch, api):
    """copy_mode dma on the CPU: the post and wait kernels under the interpreter, the host loop (native: the C
    thread with its host stand-ins for the driver calls; torch: the Python thread) reading each prefetched plan
    from the ring and copying the experts (a block's own plans go to the device kernel: on_demand posts none);
    every policy gives gpu_only's tokens and logits bitwise, every posted plan was handled, and the thread is
    gone after the run."""
    pytest.importorskip("triton")
    import threading

    from infer.offload import DmaCopier

    model, store, ids, mask, kw, ref = _dma_case(pregated_ckpt, monkeypatch, api, rows=2, new_tokens=3)
    issued, natives = [], []
    real_close = DmaCopier.close

    def close(self):
        issued.append((self.issued, int(self.posted.sum())))
        if self._native is not None:
            natives.append(self._native)
        real_close(self)

    monkeypatch.setattr(DmaCopier, "close", close)
    for spec, slots in ((PolicySpec("pregated"), 4), (PolicySpec("on_demand"), 4),
                        (PolicySpec("pregated", 2, "lru"), 4), (PolicySpec("prefetch_all"), 16)):
        res = Engine(model, store, "cpu", copy_mode="dma", prefill_slots=slots,
                     copy=CopySettings(dma_api=api)).run(spec, ids, mask, **kw)
        assert res.metrics["copy_mode"] == "dma" and res.metrics["dma_api_used"] == api
        slow = res.metrics["dma_slowest_call"]  # the C loop times its driver calls; the Python loops do not
        assert (slow is None) == (api != "native" or spec.name == "on_demand"), (spec, slow)
        assert slow is None or (slow["ms"] >= 0 and slow["plan"] >= 1 and slow["call"].startswith("cu"))
        assert res.tokens == ref.tokens, spec
        assert all(torch.equal(a, b) for a, b in zip(ref.step_logits, res.step_logits)), spec
        handled, posted = issued[-1]
        assert handled == posted and (posted == 0) == (spec.name == "on_demand"), spec
    assert not any(t.name == "pgmoe-dma-copier" for t in threading.enumerate())
    assert len(natives) == (4 if api == "native" else 0) and all(c.stop == 1 for c in natives)  # stopped, joined


def test_dma_early_guess_end_to_end(pregated_ckpt, monkeypatch):
    """copy_mode dma (native loop, host stand-ins) with one-row greedy decoding: the choice hands the next step's
    guess to the copier, which copies it before the step's plan; the guess plans find their copies done; tokens and
    logits stay gpu_only's bitwise; PGMOE_EARLY_GUESS=0 turns it off (no counts)."""
    pytest.importorskip("triton")
    model, store, ids, mask, kw, ref = _dma_case(pregated_ckpt, monkeypatch, "native", rows=1, new_tokens=8)
    for env in ("1", "0"):
        monkeypatch.setenv("PGMOE_EARLY_GUESS", env)
        eng = Engine(model, store, "cpu", copy_mode="dma", copy=CopySettings(dma_api="native"))
        eng.first_block_guess = "keep"
        for _ in range(2):  # the second run guesses every step (the table kept)
            res = eng.run(PolicySpec("pregated"), ids, mask, **kw)
        assert res.tokens == ref.tokens
        assert all(torch.equal(a, b) for a, b in zip(ref.step_logits, res.step_logits))
        g = res.metrics["first_block_guess"]
        if env == "0":
            assert g["early"] is None
        else:
            assert g["lookups"] > 0 and 0 < g["early"]["used"] <= g["early"]["copied"], g


@pytest.mark.parametrize("polls, message", [("many", "expected a number of polls"), ("0", "expected at least 1 poll")])
def test_dma_wait_polls_setting_is_checked(pregated_ckpt, monkeypatch, polls, message):
    """PGMOE_DMA_WAIT_POLLS (the wait kernel's budget before it counts a timeout) must be a positive number."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PGMOE_DMA_WAIT_POLLS", polls)
    model, store = load_offloaded(pregated_ckpt, "cpu", torch.float32, None)
    model.set_backend("torch")
    ids, mask = prompts(n=1, length=5)
    with pytest.raises(OffloadError, match=f"PGMOE_DMA_WAIT_POLLS={polls!r}: {message}"):
        Engine(model, store, "cpu", copy_mode="dma").run(PolicySpec("pregated"), ids, mask, max_new_tokens=2)


def test_dma_native_falls_back_where_it_cannot_be_built(pregated_ckpt, monkeypatch):
    """dma_api=native where the C loop cannot be built (no compiler): the Python thread copies instead, the run
    says which API it used and why, and its tokens are gpu_only's."""
    pytest.importorskip("triton")
    from infer import native_copier

    def no_compiler():
        raise native_copier.NativeUnavailable("no C compiler (cc, gcc or clang; or set CC) to build the native copier")

    monkeypatch.setattr(native_copier, "build", no_compiler)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, store = load_offloaded(pregated_ckpt, "cpu", torch.float32, None)
    model.set_backend("torch")
    ids, mask = prompts(n=2, length=5)
    ref = Engine(model, store, "cpu").run(PolicySpec("gpu_only"), ids, mask, max_new_tokens=3)
    res = Engine(model, store, "cpu", copy_mode="dma").run(PolicySpec("pregated"), ids, mask, max_new_tokens=3)
    assert res.metrics["dma_api_used"] == "torch" and "no C compiler" in res.metrics["dma_api_fallback"]
    assert res.tokens == ref.tokens and not native_copier.usable("native")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA driver path needs a GPU")
def test_dma_driver_api_on_the_gpu(pregated_ckpt, monkeypatch):
    """offload.dma_api native (the default: the C loop calling the CUDA driver), driver (a Python thread calling
    it) and torch: gpu_only's tokens and logits, and the API asked for is the one used."""
    monkeypatch.setenv("CUDA_MODULE_LOADING", "EAGER")
    assert CopySettings().dma_api == "native"
    model, store = load_offloaded(pregated_ckpt, "cuda", torch.float32, None)
    ids, mask = prompts(n=2, length=5)
    kw = dict(max_new_tokens=6, keep_logits=True)
    ref = Engine(model, store, "cuda").run(PolicySpec("gpu_only"), ids, mask, **kw)
    for api in ("native", "driver", "torch"):
        res = Engine(model, store, "cuda", copy_mode="dma", copy=CopySettings(dma_api=api)).run(
            PolicySpec("pregated"), ids, mask, **kw)
        assert res.metrics["copy_mode"] == "dma" and res.tokens == ref.tokens and res.metrics["dma_api_used"] == api
        assert all(torch.equal(a, b) for a, b in zip(ref.step_logits, res.step_logits))


@pytest.mark.parametrize("api", ["native", "torch"])
def test_dma_beam_search(pregated_ckpt, monkeypatch, api):
    """copy_mode dma with beams: with the native loop the run copies by dma; with a Python copier thread it uses
    the device copy kernel instead and says so in its notes. Either gives gpu_only's beams."""
    pytest.importorskip("triton")
    from infer import native_copier
    from infer.engine import BEAM_DMA_NOTE

    if api == "native" and not native_copier.usable("native"):
        pytest.skip("the native copier does not build here")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, store = load_offloaded(pregated_ckpt, "cpu", torch.float32, None)
    model.set_backend("torch")
    ids, mask = prompts(n=1, length=5)
    kw = dict(max_new_tokens=3, num_beams=2)
    ref = Engine(model, store, "cpu").run(PolicySpec("gpu_only"), ids, mask, **kw)
    res = Engine(model, store, "cpu", copy_mode="dma", copy=CopySettings(dma_api=api)).run(
        PolicySpec("pregated"), ids, mask, **kw)
    if api == "native":
        assert res.metrics["copy_mode"] == "dma" and res.metrics["dma_api_used"] == "native"
        assert BEAM_DMA_NOTE not in res.notes
    else:
        assert res.metrics["copy_mode"] == "device" and BEAM_DMA_NOTE in res.notes
    assert res.tokens == ref.tokens


def test_dma_takes_prefetched_plans_from_the_second_decode_step():
    """A pool's first decode step sends its prefetched plans to the copy kernel (so that every kernel of the
    step is loaded before a dma wait spins); from a block's second prefetched plan on they go to the copier."""
    from types import SimpleNamespace

    from infer.offload import SlotPool

    early = []  # the copier's early guess copies follow: on from the second step
    pool = SimpleNamespace(_dma_on=False, _dma_first_step=set(), _dma_held=0, _skip_copies=False,
                           dma=SimpleNamespace(early_on=False))
    pool._early_update = lambda: (SlotPool._early_update(pool), early.append(pool.dma.early_on))
    blocks = [3, 5, 7, 3, 5, 7, 3]
    assert [SlotPool._dma_live(pool, m) for m in blocks] == [False, False, False, True, True, True, True]
    assert early == [True] and pool.dma.early_on


def test_dma_held_sends_every_plan_to_the_copy_kernel_and_keeps_the_bookkeeping():
    """Inside SlotPool.dma_held() (a CUDA graph's eager warm-up steps) no plan goes to the copier, but the
    first-step bookkeeping goes on: the steps after it (the captured one) post as they would have. Nested holds
    release at the outermost."""
    from types import SimpleNamespace

    from infer.offload import SlotPool

    pool = SimpleNamespace(_dma_on=False, _dma_first_step=set(), _dma_held=0, dma=None, cuda=False, _skip_copies=False)
    pool._early_update = lambda: SlotPool._early_update(pool)
    with SlotPool.dma_held(pool):
        with SlotPool.dma_held(pool):
            held = [SlotPool._dma_live(pool, m) for m in (3, 5, 3)]
        held.append(SlotPool._dma_live(pool, 5))
    assert held == [False, False, False, False] and pool._dma_on and pool._dma_held == 0
    assert SlotPool._dma_live(pool, 3)  # released: the copier's again
    # the early guess copies: off while held or copying nothing
    pool.dma = SimpleNamespace(early_on=None)
    with SlotPool.dma_held(pool):
        assert pool.dma.early_on is False
    assert pool.dma.early_on is True
    pool._skip_copies = True
    SlotPool._early_update(pool)
    assert pool.dma.early_on is False


def test_dma_asks_for_eager_kernel_loading(monkeypatch):
    """copy_mode dma needs CUDA_MODULE_LOADING=EAGER: an entry point sets it where nothing chose a mode yet,
    and leaves a mode already chosen (torch's LAZY, or the user's) alone."""
    from infer.offload import eager_module_loading, request_eager_module_loading

    monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)
    assert not eager_module_loading()
    assert request_eager_module_loading() and os.environ["CUDA_MODULE_LOADING"] == "EAGER"
    monkeypatch.setenv("CUDA_MODULE_LOADING", "LAZY")
    assert not request_eager_module_loading() and os.environ["CUDA_MODULE_LOADING"] == "LAZY"


def test_dma_copier_reports_a_failed_copy(pregated_ckpt, monkeypatch):
    """A copier that fails (here: its copy raises) makes the waits time out, and the run raises instead of
    returning tokens computed from stale experts."""
    pytest.importorskip("triton")
    from infer.offload import DmaCopier

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(DmaCopier, "MAX_ITERS_INTERPRETED", 50)

    def broken(self, seen):
        if int(self.head_h[0]) > seen[0]:
            raise RuntimeError("no copy engine")
        return False

    monkeypatch.setattr(DmaCopier, "_poll", broken)
    # (the native loop times its driver calls; the error names the slowest: a stand-in here, the loop is Python's)
    monkeypatch.setattr(DmaCopier, "slowest_call", {"ms": 12.0, "plan": 3, "call": "cuMemcpyHtoDAsync"})
    model, store = load_offloaded(pregated_ckpt, "cpu", torch.float32, None)
    model.set_backend("torch")
    ids, mask = prompts(n=2, length=5)
    # (the timeout's text also names the usual cause: a blocking copy to pageable host memory during a step)
    with pytest.raises(OffloadError, match="copy_mode=dma.*no copy engine.; its slowest driver call: "
                                           "cuMemcpyHtoDAsync for plan 3, 12.0 ms.*timed out.*pageable host memory"):
        Engine(model, store, "cpu", copy_mode="dma", copy=CopySettings(dma_api="torch")).run(
            PolicySpec("pregated"), ids, mask, max_new_tokens=2)


@pytest.mark.parametrize("bad", [dict(priority="urgent"), dict(programs=0), dict(programs=2.5),
                                 dict(block=1000), dict(block=128), dict(warps=3), dict(dma_api="cuda")])
def test_copy_settings_refuse_bad_values(bad):
    field = next(iter(bad))
    with pytest.raises(OffloadError, match=f"offload.(copy_)?{field}="):  # (dma_api: offload.dma_api=)
        CopySettings(**bad)


def test_triton_beam_search_with_prefill_streaming_matches_gpu_only(pregated_ckpt, monkeypatch):
    """Beam search (4 beams) on the Triton expert FFN (interpreter, fp32, where the decode and prefill
    paths differ in the last bits): the encoder's experts streamed through 4 prefill slots (chunks of
    2 experts, each chunk's tokens alone: few enough for the decode path) still give gpu_only's tokens
    and bitwise-equal logits, since every chunk takes the config of the block's whole token count."""
    pytest.importorskip("triton")
    from kernels import tuning

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PGMOE_FORCE_TRITON", "1")
    monkeypatch.setattr(tuning, "_chosen", {})
    model, store = load_offloaded(pregated_ckpt, "cpu", torch.float32, None)
    model.set_backend("triton")
    cfg = model.cfg
    # the decode step (4 rows) with whole-row tiles: the interpreter runs a handful of programs per call
    fast = {"path": "decode", "pdl": False, "in": {"BLOCK_F": cfg.d_ff, "BLOCK_D": cfg.d_model, "num_warps": 4},
            "out": {"BLOCK_D": cfg.d_model, "BLOCK_F": cfg.d_ff, "num_warps": 4}}
    key = tuning.config_key("ffn", cfg.num_experts, cfg.d_model, cfg.d_ff, 4, torch.float32, torch.float32)
    tuning.set_config(key, torch.device("cpu"), fast)
    ids, mask = prompts(n=1, length=8)
    kw = dict(max_new_tokens=3, num_beams=4, keep_logits=True)
    ref = Engine(model, store, "cpu").run(PolicySpec("gpu_only"), ids, mask, **kw)
    eng = Engine(model, store, "cpu", prefill_slots=4)
    for spec in (PolicySpec("on_demand"), PolicySpec("pregated")):
        res = eng.run(spec, ids, mask, **kw)
        assert res.metrics["pool_slots"]["prefill"] == 4
        _same(ref, res)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_int8_experts_every_policy_matches_int8_gpu_only(pregated_ckpt, num_beams):
    """offload.quantize=int8: every policy and cache computes from the same int8 weights as gpu_only, so
    the outputs are gpu_only's bitwise; and the quantization itself moves the logits only a little."""
    model, store = load_offloaded(pregated_ckpt, "cpu", torch.float32, None, quantize="int8")
    assert store.quantize == "int8" and store.data.dtype == torch.int8
    F, D = model.cfg.d_ff, model.cfg.d_model
    assert store.expert_bytes == 2 * F * D + 4 * (F + D)  # about a quarter of fp32's 8 * F * D bytes
    eng = Engine(model, store, "cpu")
    ids, mask = prompts()
    kw = dict(max_new_tokens=6, num_beams=num_beams, keep_logits=True)
    ref = eng.run(PolicySpec("gpu_only"), ids, mask, **kw)
    for name in CPU_POLICIES:
        for size, kind in CACHES[:2]:
            res = eng.run(PolicySpec(name, size, kind), ids, mask, **kw)
            _same(ref, res)
            assert res.metrics["bytes_copied"] == res.metrics["experts_copied"] * store.expert_bytes
    full = _engine(pregated_ckpt).run(PolicySpec("gpu_only"), ids, mask, **kw)
    first = (ref.step_logits[0] - full.step_logits[0]).abs().max() / full.step_logits[0].abs().max()
    assert 0 < first < 0.05, first


def test_int8_store_round_trip_and_errors(pregated_ckpt, monkeypatch):
    """The int8 chunk holds q and the row scales: dequantized, within int8's rounding of the checkpoint's
    weights; the device copy kernel (interpreter) moves the chunks as 4-byte words; CPU compute refuses."""
    from infer.offload import _moe_names
    from kernels.expert_ffn import Int8Weights
    from models.checkpoint import CheckpointReader, key_map

    model, store = load_offloaded(pregated_ckpt, "cpu", torch.float32, None, quantize="int8")
    w = store.w_in(1, 2)
    assert isinstance(w, Int8Weights) and w.q.dtype == torch.int8 and w.scale.dtype == torch.float32
    block = _moe_names(model)[1]
    key = next(k for k, (own, e) in key_map(model.cfg, model).items() if own == f"{block}.w_in" and e == 2)
    ref = CheckpointReader(pregated_ckpt).get(key)
    deq = w.q.float() * w.scale[:, None]
    assert ((deq - ref).abs() <= w.scale[:, None] / 2 + 1e-7).all()
    with pytest.raises(OffloadError, match="cpu_compute=always with offload.quantize=int8"):
        Engine(model, store, "cpu", cpu_compute="always").run(PolicySpec("on_demand"), *prompts(), max_new_tokens=2)
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ids, mask = prompts(n=2, length=5)
    kw = dict(max_new_tokens=2, keep_logits=True)
    ref = Engine(model, store, "cpu").run(PolicySpec("gpu_only"), ids, mask, **kw)
    res = Engine(model, store, "cpu", copy_mode="device").run(PolicySpec("pregated", 2, "lru"), ids, mask, **kw)
    assert res.metrics["copy_mode"] == "device" and res.tokens == ref.tokens
    assert all(torch.equal(a, b) for a, b in zip(ref.step_logits, res.step_logits))


def test_early_end_runs_one_step_past_the_output_and_reports_it(pregated_ckpt, monkeypatch):
    """Greedy queues a step before it reads whether every row ended: where the run ends early (here
    every row is made to emit EOS at step 3), one step more than the output ran
    (decode_steps_executed), and the tokens, logits and timed steps are the output's only, for
    gpu_only and an offloading policy alike."""
    import infer.engine as engine_mod

    eng = _engine(pregated_ckpt)
    ids, mask = prompts()
    kw = dict(max_new_tokens=8, keep_logits=True)
    full = eng.run(PolicySpec("gpu_only"), ids, mask, **kw)
    assert full.metrics["decode_steps_executed"] == full.metrics["new_tokens"] == 8
    eos, k = eng.model.cfg.eos_token_id, 3
    real_greedy = engine_mod.greedy

    def greedy_ending_at_k(model, *a, step=None, select=None, **kw2):
        calls = []  # (select not passed on: a choice captured in a graph would not see the changed logits)

        def ending(state, tok):
            logits = step(state, tok)
            calls.append(1)
            return logits.index_fill(-1, torch.tensor([eos]), float("inf")) if len(calls) == k + 1 else logits

        return real_greedy(model, *a, step=ending, **kw2)

    monkeypatch.setattr(engine_mod, "greedy", greedy_ending_at_k)
    for name in ("gpu_only", "pregated"):
        r = eng.run(PolicySpec(name), ids, mask, **kw)
        assert r.tokens == [row[:k] + [eos] for row in full.tokens], name
        assert r.metrics["new_tokens"] == k + 1 and r.metrics["decode_steps_executed"] == k + 2
        assert len(r.metrics["decode_ms"]) == k and len(r.step_logits) == k + 1
        for a, b in zip(full.step_logits, r.step_logits):
            assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------- first-block guess
def _token_routed_checkpoint(path):
    """A tiny pre-gated model whose decoder's first MoE block sees (almost) only the token's embedding: the
    layers before its FFN add outputs scaled by 1e-6, so its router's choice is the embedding guess."""
    from models.checkpoint import load_switch, save_switch

    src = tiny_checkpoint(path.parent / (path.name + "-src"), pregated=True)
    model = load_switch(src, dtype=torch.float32)
    dec = model.decoder.blocks
    first = next(i for i, b in enumerate(dec) if b.sparse)
    with torch.no_grad():
        for i in range(first + 1):
            dec[i].self_attn.o.weight.mul_(1e-6)
            dec[i].cross_attn.o.weight.mul_(1e-6)
            if i < first:
                dec[i].ff.wo.weight.mul_(1e-6)
    save_switch(model, path)
    return path


def _guess_runs(eng, ids, modes, **kw):
    out = {}
    for mode in modes:
        eng.first_block_guess = mode
        out[mode] = eng.run(PolicySpec("pregated"), ids, None, **kw)
    return out


def _guess_modes(path, max_new_tokens):
    """gpu_only's run, and pregated's with the guess off, run, keep, and keep again (the table kept), greedy
    batch 1 on one engine."""
    eng = _engine(path)
    ids, _ = prompts(n=1)
    kw = dict(max_new_tokens=max_new_tokens, keep_logits=True)
    ref = eng.run(PolicySpec("gpu_only"), ids, None, **kw)
    res = _guess_runs(eng, ids, ("off", "run", "keep"), **kw)
    res["keep2"] = _guess_runs(eng, ids, ("keep",), **kw)["keep"]
    return eng, ref, res


def test_first_block_guess_accounting_and_outputs(pregated_ckpt):
    """The guess never changes the outputs (bitwise, whatever it guessed); greedy batch 1: one guess per step
    in the decoder's first MoE block for a token seen before, and every missed guess costs exactly one more
    expert copied than no guess. keep: a second run of the same prompt guesses every step."""
    eng, ref, res = _guess_modes(pregated_ckpt, 8)
    first_dec = len(eng.model.encoder.moes)
    steps = len(ref.step_logits)
    off = res["off"].metrics["experts_copied"]
    for mode, r in res.items():
        _same(ref, r)
        g = r.metrics["first_block_guess"]
        if mode == "off":
            assert g == {"mode": "off", "blocks": [], "rows": 0, "lookups": 0, "hits": 0, "hit_rate": None,
                         "early": None}
            continue
        assert g["mode"] == mode[:4] and g["blocks"] == [first_dec]
        assert g["rows"] == steps and 0 <= g["hits"] <= g["lookups"] <= g["rows"]
        assert r.metrics["experts_copied"] == off + g["lookups"] - g["hits"], mode
    assert res["keep2"].metrics["first_block_guess"]["lookups"] == steps  # every token seen in run 1


def test_guess_lookup_in_the_plan_equals_the_index_select(pregated_ckpt, monkeypatch):
    """The guess looked up inside the slot plan (the default) and by an index_select ahead of it
    (PGMOE_GUESS_LOOKUP=0): the same outputs, guesses and copies."""
    eng = _engine(pregated_ckpt)
    ids, _ = prompts(n=1)
    kw = dict(max_new_tokens=6, keep_logits=True)
    res = {}
    for lookup in ("1", "0"):
        monkeypatch.setenv("PGMOE_GUESS_LOOKUP", lookup)
        res[lookup] = _guess_runs(eng, ids, ("run",), **kw)["run"]
    _same(res["1"], res["0"])
    for key in ("first_block_guess", "experts_copied"):
        assert res["1"].metrics[key] == res["0"].metrics[key], key
    assert res["1"].metrics["first_block_guess"]["lookups"] > 0


def test_first_block_guess_hits_where_the_block_routes_by_token(tmp_path):
    """Where the first decoder MoE block routes by the token alone, every guess hits (a seen token's expert)
    and costs no copy more than no guess; keep: the next run of the same prompt guesses every step."""
    _, ref, res = _guess_modes(_token_routed_checkpoint(tmp_path / "token-routed"), 12)
    for mode in ("run", "keep", "keep2"):
        _same(ref, res[mode])
        g = res[mode].metrics["first_block_guess"]
        assert g["hits"] == g["lookups"], mode
        assert res[mode].metrics["experts_copied"] == res["off"].metrics["experts_copied"], mode
    assert res["keep2"].metrics["first_block_guess"]["lookups"] == len(ref.step_logits)
    assert res["run"].metrics["first_block_guess"]["lookups"] == res["keep"].metrics["first_block_guess"]["lookups"]


def test_first_block_guess_blocks_and_errors(tmp_path):
    """lookahead L: the first L decoder MoE blocks (no pre-gate routes them) are guessed; on_demand guesses
    nothing; a bad mode is an error naming the setting."""
    path = tiny_checkpoint(tmp_path / "la2", lookahead=2, num_layers=8, num_decoder_layers=8,
                           num_sparse_encoder_layers=4, num_sparse_decoder_layers=4)
    eng = _engine(path)
    ids, mask = prompts()
    kw = dict(max_new_tokens=4, keep_logits=True)
    ref = eng.run(PolicySpec("gpu_only"), ids, mask, **kw)
    la = eng.run(PolicySpec("lookahead"), ids, mask, **kw)
    _same(ref, la)
    assert la.metrics["first_block_guess"]["blocks"] == [4, 5]
    assert eng.run(PolicySpec("on_demand"), ids, mask, **kw).metrics["first_block_guess"]["blocks"] == []
    with pytest.raises(OffloadError, match="first_block_guess"):
        Engine(eng.model, eng.store, "cpu", first_block_guess="always")
    from infer.policies import guess_mode  # Hydra hands a bool override to the str key as "True" / "False"

    assert [guess_mode(v) for v in (True, "True", False, "false", "run", "keep", "off")] == [
        "keep", "keep", "off", "off", "run", "keep", "off"]


def test_dma_watchdog_dumps_the_stacks_of_a_stalled_copier(capfd):
    """PGMOE_DMA_WATCHDOG_S's watchdog: plans posted but none handled for longer than its limit -> one message
    naming the counts and every thread's Python stack on stderr; a copier that keeps up -> nothing."""
    import time as _time

    from infer.offload import _Watchdog

    class Stalled:
        issued, head_h = 3, torch.tensor([5])

    class Idle:
        issued, head_h = 5, torch.tensor([5])

    for copier, want in ((Idle(), False), (Stalled(), True)):
        dog = _Watchdog(copier, 0.2)
        _time.sleep(0.8)
        dog.stop()
        err = capfd.readouterr().err
        assert ("the copier has handled no plan" in err) == want
        if want:
            assert "(handled 3, posted 5)" in err and err.count("[pgmoe dma watchdog]") == 1
            assert "test_dma_watchdog_dumps_the_stacks_of_a_stalled_copier" in err  # the main thread's stack
    with pytest.raises(OffloadError, match="PGMOE_DMA_WATCHDOG_S=0.0"):
        _Watchdog(Idle(), 0.0)


# ----------------------------------------------------------------------------------------------- compression
@pytest.mark.parametrize("codec", ["exp4", "expv"])
def test_compressed_store_every_policy_matches_uncompressed_gpu_only(pregated_ckpt, codec):
    """offload.compress=exp4 / expv: the experts are stored and copied packed (exp4: under 80% of bf16's bytes here;
    expv: a prefix of each chunk, fewer bytes than exp4's), the slots hold them unpacked, bitwise the weights gpu_only
    computes with: every policy and cache (and gpu_only from the packed store) gives the uncompressed gpu_only's
    tokens and logits bitwise; copies count the packed bytes; the slots are bf16 rows."""
    model, store = load_offloaded(pregated_ckpt, "cpu", torch.bfloat16, None)
    model_c, packed = load_offloaded(pregated_ckpt, "cpu", torch.bfloat16, None, compress=codec)
    F, D = model.cfg.d_ff, model.cfg.d_model
    assert packed.compress == codec and packed.data.dtype == torch.uint8
    assert packed.row_bytes == packed.layout.nbytes < 0.8 * store.expert_bytes
    if codec == "exp4":
        assert packed.expert_bytes == packed.layout.nbytes
    else:  # the longest packed prefix: what each copy moves
        _, exp4 = load_offloaded(pregated_ckpt, "cpu", torch.bfloat16, None, compress="exp4")
        assert 0 < packed.expert_bytes < exp4.expert_bytes  # the longest packed prefix: what each copy moves
        assert packed.total_bytes == packed.M * packed.E * packed.row_bytes
    assert packed.slot_bytes == store.expert_bytes == 2 * 2 * F * D
    for m, e in ((0, 0), (packed.M - 1, packed.E - 1), (1, 2)):
        assert torch.equal(packed.chunk(m, e).view(torch.int16), store.data[m, e].view(torch.int16))
    assert torch.equal(packed.unpacked_block(1).view(torch.int16), store.data[1].view(torch.int16))
    ids, mask = prompts()
    kw = dict(max_new_tokens=5, keep_logits=True)
    ref = Engine(model, store, "cpu").run(PolicySpec("gpu_only"), ids, mask, **kw)
    eng = Engine(model_c, packed, "cpu")
    _same(ref, eng.run(PolicySpec("gpu_only"), ids, mask, **kw))
    for name in CPU_POLICIES:
        for size, kind in CACHES[:2]:
            res = eng.run(PolicySpec(name, size, kind), ids, mask, **kw)
            _same(ref, res)
            assert res.metrics["bytes_copied"] == res.metrics["experts_copied"] * packed.expert_bytes
            assert res.metrics["pool_prefill_bytes"] == res.metrics["pool_slots"]["prefill"] * packed.slot_bytes


@pytest.mark.parametrize("codec", ["exp4", "expv"])
@pytest.mark.parametrize("mode", ["device", "dma-native", "dma-torch"])
def test_compressed_store_on_the_gpu_path_under_the_interpreter(pregated_ckpt, monkeypatch, mode, codec):
    """The GPU path of a compressed store on the CPU: decode plans land the packed chunks (exp4: in the pool's spare
    prefill rows when they fit, else their own memory; expv: always its own, a row per slot): with dma the copier's,
    unpacked at each block's wait; with device the plain copy kernel's, unpacked behind it; the streamed prefill
    chunks unpack as the kernel reads the store (exp4) or land first (expv); tokens and logits are the uncompressed
    gpu_only's bitwise."""
    pytest.importorskip("triton")
    copy_mode, _, api = mode.partition("-")
    _native_or_skip(api)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, store = load_offloaded(pregated_ckpt, "cpu", torch.bfloat16, None)
    model_c, packed = load_offloaded(pregated_ckpt, "cpu", torch.bfloat16, None, compress=codec)
    ids, mask = prompts(n=2, length=5)
    kw = dict(max_new_tokens=3, keep_logits=True)
    ref = Engine(model, store, "cpu").run(PolicySpec("gpu_only"), ids, mask, **kw)
    copy = CopySettings(dma_api=api or "native", programs=2, block=256, warps=1)
    for spec, slots in ((PolicySpec("pregated"), 16), (PolicySpec("on_demand"), 4),
                        (PolicySpec("pregated", 2, "lru"), 4)):
        res = Engine(model_c, packed, "cpu", copy_mode=copy_mode, prefill_slots=slots, copy=copy).run(
            spec, ids, mask, **kw)
        assert res.metrics["copy_mode"] == copy_mode
        _same(ref, res)
        # decode plans land packed (dma: the copier; device: the plain copy kernel), then unpack; no cache and 16
        # prefill rows: the landing fits in the rows past the staging buffers
        assert res.metrics["landing_bytes"] > 0
        assert res.metrics["landing_in_pool"] == (codec == "exp4" and spec.cache_size == 0 and slots == 16), spec
        if codec == "expv":
            assert res.metrics["landing_bytes"] == res.metrics["pool_bytes"] // packed.slot_bytes * packed.row_bytes


def test_compress_auto_picks_exp4_only_where_it_applies():
    """offload.compress=auto: exp4 on a GPU with bf16 experts, no quantize, no CPU compute, a copy mode that unpacks
    on the GPU; none elsewhere, with the reason; an explicit value is taken as is (check_settings judges it)."""
    r = ExpertStore.resolve_compress
    bf = torch.bfloat16
    assert r("auto", "cuda", bf) == ("exp4", "offload.compress=auto: exp4 (bf16 experts copied to the GPU packed "
                                     "losslessly)")
    assert r("auto", "cuda:1", bf, copy_mode="dma")[0] == "exp4"
    assert r("auto", "cpu", bf) == (None, "offload.compress=auto: none (the experts are not copied to a GPU)")
    assert r("auto", "cuda", torch.float32) == (None, "offload.compress=auto: none (the experts are float32, not "
                                                "bfloat16)")
    assert r("auto", "cuda", bf, quantize="int8") == (None, "offload.compress=auto: none (offload.quantize=int8)")
    assert r("auto", "cuda", bf, cpu_compute="auto") == (None, "offload.compress=auto: none "
                                                         "(offload.cpu_compute=auto)")
    assert r("auto", "cuda", bf, copy_mode="host") == (None, "offload.compress=auto: none (offload.copy_mode=host)")
    assert r("none", "cuda", bf) == (None, "offload.compress=none") == r(None, "cuda", bf)
    assert r("exp4", "cpu", torch.float32) == ("exp4", "offload.compress=exp4")
    # by the experts' size (bf16 bytes): expv from EXPV_MIN_BYTES (16 MiB) on, exp4 below; explicit values as they are
    large, base = 2 * 1024 * 4096 * 2, 2 * 768 * 3072 * 2  # switch-large's and switch-base's experts
    assert r("auto", "cuda", bf, expert_bytes=large) == (
        "expv", "offload.compress=auto: expv (bf16 experts of 16.0 MiB, at least offload.expv_min_mib=16, copied to "
                "the GPU packed losslessly)")
    assert r("auto", "cuda", bf, expert_bytes=base) == ("exp4", "offload.compress=auto: exp4 (bf16 experts of 9.0 "
                                                        "MiB copied to the GPU packed losslessly)")
    assert r("auto", "cuda", bf, expert_bytes=base, expv_min_bytes=8 * 2**20)[0] == "expv"
    assert r("auto", "cpu", bf, expert_bytes=large)[0] is None
    assert r("exp4", "cuda", bf, expert_bytes=large)[0] == "exp4" and r("expv", "cuda", bf)[0] == "expv"
    with pytest.raises(OffloadError, match="offload.compress=.zip.; expected none, exp4, expv or auto"):
        ExpertStore.check_settings(bf, None, r("zip", "cuda", bf)[0])


def test_compress_of_an_expert_that_does_not_pack(tmp_path, capsys):
    """An expert with more exceptions than its layout holds (weights 2^-20 apart in one group): exp4 refuses,
    naming the block and the fix; with fallback (offload.compress=auto) the store is left unpacked and gives the
    same tokens as an uncompressed load. Packing a slice of rows at a time gives the same bytes as all at once."""
    from models.checkpoint import load_switch, save_switch

    src = tiny_checkpoint(tmp_path / "src", pregated=True)
    model = load_switch(src, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model.moes[1].w_in[2].view(-1)[::2] *= 2.0 ** -20
    bad = tmp_path / "bad"
    save_switch(model, bad)
    with pytest.raises(PackFailed, match=r"offload.compress=exp4: MoE block 1: .*offload.compress=none stores"):
        load_offloaded(bad, "cpu", torch.bfloat16, None, compress="exp4")
    with pytest.raises(PackFailed, match=r"offload.compress=expv: MoE block 1: .*offload.compress=exp4 or none"):
        load_offloaded(bad, "cpu", torch.bfloat16, None, compress="expv")
    capsys.readouterr()
    model_f, store_f = load_offloaded(bad, "cpu", torch.bfloat16, None, compress="exp4", fallback=True)
    assert "[infer] offload.compress=auto: offload.compress=exp4: MoE block 1" in capsys.readouterr().out
    # auto's chain from expv: exp4 next (it fails here too), then none
    _, store_v = load_offloaded(bad, "cpu", torch.bfloat16, None, compress="expv", fallback=True)
    out = capsys.readouterr().out
    assert "offload.compress=expv: MoE block 1" in out and "; trying exp4" in out and "; trying none" in out
    assert store_v.compress is None and torch.equal(store_v.data.view(torch.int16), store_f.data.view(torch.int16))
    model_p, plain = load_offloaded(bad, "cpu", torch.bfloat16, None)
    assert store_f.compress is None and torch.equal(store_f.data.view(torch.int16), plain.data.view(torch.int16))
    ids, mask = prompts()
    kw = dict(max_new_tokens=4, keep_logits=True)
    _same(Engine(model_p, plain, "cpu").run(PolicySpec("gpu_only"), ids, mask, **kw),
          Engine(model_f, store_f, "cpu").run(PolicySpec("pregated"), ids, mask, **kw))
    # slices: one row at a time (slice_bytes under a row) against the whole block
    _, packed = load_offloaded(src, "cpu", torch.bfloat16, None, compress="exp4")
    rows = packed.unpacked_block(0)
    whole = packed.data[0].clone()
    packed.data[0].zero_()
    packed.pack_block(0, rows, "cpu", slice_bytes=1)
    assert torch.equal(packed.data[0], whole)


def test_compress_settings_are_checked(pregated_ckpt):
    with pytest.raises(OffloadError, match="offload.compress=exp4 packs bf16 weights; the experts here are float32"):
        load_offloaded(pregated_ckpt, "cpu", torch.float32, None, compress="exp4")
    with pytest.raises(OffloadError, match="does not apply to offload.quantize=int8"):
        load_offloaded(pregated_ckpt, "cpu", torch.bfloat16, None, quantize="int8", compress="exp4")
    with pytest.raises(OffloadError, match="offload.compress='zstd'; expected none, exp4, expv or auto"):
        load_offloaded(pregated_ckpt, "cpu", torch.bfloat16, None, compress="zstd")
    model, packed = load_offloaded(pregated_ckpt, "cpu", torch.bfloat16, None, compress="exp4")
    with pytest.raises(OffloadError, match="use copy_mode device or dma"):
        Engine(model, packed, "cpu", copy_mode="host").run(PolicySpec("on_demand"), *prompts(), max_new_tokens=1)
    with pytest.raises(OffloadError, match="cpu_compute=always with offload.compress=exp4"):
        Engine(model, packed, "cpu", cpu_compute="always").run(PolicySpec("on_demand"), *prompts(), max_new_tokens=1)
