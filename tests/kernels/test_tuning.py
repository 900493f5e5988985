"""Config keys, the lookup order, and the tuned tables in kernels/configs/ (each config must be one the
launchers accept: a few are run under the interpreter on a small problem)."""

import json

import pytest
import torch

pytest.importorskip("triton")

from kernels import tuning  # noqa: E402
from kernels.expert_ffn import expert_ffn_reference, expert_ffn_triton  # noqa: E402
from kernels.routing import route_reference, route_triton  # noqa: E402

TABLES = sorted(tuning.CONFIG_DIR.glob("*.json"))


def test_keys():
    assert [tuning.token_bucket(n) for n in (0, 1, 2, 3, 4, 5, 256, 257)] == [1, 1, 2, 4, 4, 8, 256, 512]
    assert tuning.config_key("ffn", 8, 768, 3072, 3) == "ffn:E8:d768:F3072:T4"
    assert tuning.config_key("ffn", 8, 768, 3072, 3, torch.bfloat16) == "ffn:E8:d768:F3072:T4"
    assert tuning.config_key("route", 8, 768, 0, 1, torch.bfloat16, torch.float32) == \
        "route-bfloat16-float32:E8:d768:F0:T1"


def test_pick_order():
    cpu = torch.device("cpu")
    key = "test-only:E1:d1:F1:T1"
    assert tuning.current(key, cpu) is None
    assert tuning.pick(key, cpu, default=lambda: {"a": 1}) == {"a": 1}  # no table for "cpu": the default
    tuning.set_config(key, cpu, {"a": 2})
    assert tuning.pick(key, cpu, default=lambda: {"a": 1}) == {"a": 2}
    tuning.set_config(key, cpu, None)
    assert tuning.current(key, cpu) is None


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.name)
def test_tuned_table_configs_run(table):
    configs = json.loads(table.read_text())["configs"]
    assert configs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, generator=g)
    w_in, w_out = torch.randn(8, 56, 40, generator=g) / 7, torch.randn(8, 40, 56, generator=g) / 7
    ids = torch.randint(0, 8, (5, 1), generator=g, dtype=torch.int32)
    weights = torch.rand(5, 1, generator=g) + 0.1
    ref = expert_ffn_reference(x, w_in, w_out, ids, weights)
    tried, ran = set(), set()
    for key, cfg in configs.items():
        kind = key.split(":")[0]
        if kind == "route":
            assert {"BLOCK_T", "BLOCK_D", "num_warps", "num_stages"} <= set(cfg), key
            if "route" not in tried:
                got, _ = route_triton(x, w_in[:, 0], k=1, config=cfg)
                assert torch.equal(got, route_reference(x, w_in[:, 0], k=1)[0])
        else:
            assert cfg["path"] in ("decode", "prefill") and {"in", "out"} <= set(cfg), key
            # every distinct decode config (tiles of a few rows: cheap under the interpreter), one prefill one
            what = json.dumps(cfg, sort_keys=True) if cfg["path"] == "decode" else "prefill"
            if what not in ran:
                ran.add(what)
                y = expert_ffn_triton(x, w_in, w_out, ids, weights, config=cfg)
                assert ((y - ref).norm() / ref.norm()) <= 1e-4, key
        tried.add("route" if kind == "route" else cfg["path"])
    assert tried == {"route", "decode", "prefill"}


def _ffn_problem(T, E, S, d, f, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    w_in, w_out = torch.randn(S, f, d, generator=g) / d**0.5, torch.randn(S, d, f, generator=g) / f**0.5
    ids = torch.randint(0, E, (T, 1), generator=g, dtype=torch.int32)
    weights = torch.rand(T, 1, generator=g) + 0.1
    return x, w_in, w_out, ids, weights


def test_offload_calls_take_gpu_only_config(monkeypatch):
    """The expert FFN's config is keyed by the model's expert count and the block's token count: a call
    through a slot pool of another size, or on one chunk of the block's tokens (the encoder's streaming,
    config_tokens = the block's tokens), takes gpu_only's path and tiles, and each token's output is
    gpu_only's bitwise (fp32, where the decode and prefill paths differ in the last bits)."""
    monkeypatch.setattr(tuning, "_chosen", {})
    picked = []
    pick = tuning.pick
    monkeypatch.setattr(tuning, "pick", lambda key, *a, **kw: picked.append(key) or pick(key, *a, **kw))
    T, E, S, d, f = 40, 8, 13, 24, 40  # 40 tokens: the prefill path; a chunk of <= 16 alone: the decode path
    x, w_in, w_out, ids, weights = _ffn_problem(T, E, E, d, f)
    ref = expert_ffn_triton(x, w_in, w_out, ids, weights)  # gpu_only: all E experts resident
    assert tuning.current(picked[-1], torch.device("cpu"))["path"] == "prefill"
    # the experts in a pool of S slots, read through a slot table
    slot_of_expert = torch.randperm(S, generator=torch.Generator().manual_seed(1))[:E].to(torch.int32)
    p_in, p_out = torch.zeros(S, f, d), torch.zeros(S, d, f)
    p_in[slot_of_expert.long()], p_out[slot_of_expert.long()] = w_in, w_out
    y = expert_ffn_triton(x, p_in, p_out, ids, weights, slot_of_expert)
    assert torch.equal(y, ref)
    # streamed: two experts at a time, each chunk's tokens alone
    for e0 in range(0, E, 2):
        tok = ((ids[:, 0] >= e0) & (ids[:, 0] < e0 + 2)).nonzero().flatten()
        assert 0 < tok.numel() <= 16
        y = expert_ffn_triton(x[tok], p_in, p_out, ids[tok], weights[tok], slot_of_expert, config_tokens=T)
        assert torch.equal(y, ref[tok]), e0
    assert set(picked) == {picked[0]}, picked
    assert picked[0] == tuning.config_key("ffn", E, d, f, T, torch.float32, torch.float32)


def test_switch_base_offload_uses_the_tuned_h200_configs(monkeypatch):
    """On the H200 table: gpu_only (E = 128 resident) and every offload call (a pool of any size, a chunk
    of the encoder's tokens) of switch-base-128 get the one tuned config for (E, d, F, tokens)."""
    from kernels import expert_ffn as ffn

    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "gpu_name", lambda device: "nvidia-h200")
    table = tuning._table("nvidia-h200")
    seen = []
    choose = ffn.choose_config
    monkeypatch.setattr(ffn, "choose_config", lambda *a, **kw: seen.append(a[:3]) or choose(*a, **kw))
    d, f = 768, 3072
    for T in (1, 4, 256, 2048):
        want = table[f"ffn:E128:d{d}:F{f}:T{T}"]
        assert ffn.choose_config(T, 1, 128, d, f, "relu", torch.bfloat16, torch.bfloat16, "cpu") == want
    # what an offload call passes: E from the slot table (not the pool's slot count), the block's tokens
    x, w_in, w_out, ids, weights = _ffn_problem(4, 128, 24, 8, 8)
    slot_of_expert = torch.randint(0, 24, (128,), dtype=torch.int32)
    seen.clear()
    expert_ffn_triton(x, w_in, w_out, ids, weights, slot_of_expert, config_tokens=256)
    assert seen == [(256, 1, 128)]
