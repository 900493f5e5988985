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
    tried = set()
    for key, cfg in configs.items():
        kind = key.split(":")[0]
        if kind == "route":
            assert {"BLOCK_T", "BLOCK_D", "num_warps", "num_stages"} <= set(cfg), key
            if "route" not in tried:
                got, _ = route_triton(x, w_in[:, 0], k=1, config=cfg)
                assert torch.equal(got, route_reference(x, w_in[:, 0], k=1)[0])
        else:
            assert cfg["path"] in ("decode", "prefill") and {"in", "out"} <= set(cfg), key
            if cfg["path"] not in tried:
                y = expert_ffn_triton(x, w_in, w_out, ids, weights, config=cfg)
                assert ((y - ref).norm() / ref.norm()) <= 1e-4, key
        tried.add("route" if kind == "route" else cfg["path"])
    assert tried == {"route", "decode", "prefill"}
