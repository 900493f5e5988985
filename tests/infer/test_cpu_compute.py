"""offload.cpu_compute: missed experts computed on the CPU (host tensors of the store) instead of copied."""

import pytest
import torch

from infer.cpu_compute import Calibration
from infer.engine import Engine, load_offloaded
from infer.offload import OffloadError
from infer.policies import PolicySpec
from tests.infer.util import prompts, tiny_checkpoint

CPU_POLICIES = ["on_demand", "prefetch_all", "pregated"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "pregated", pregated=True)


def _engine(path, **kw):
    model, store = load_offloaded(path, "cpu", torch.float32, None)
    return Engine(model, store, "cpu", **kw)


def _close(ref, res):
    assert res.tokens == ref.tokens, res.policy
    assert len(res.step_logits) == len(ref.step_logits)
    for a, b in zip(ref.step_logits, res.step_logits):
        assert (a - b).abs().max().item() <= 1e-5, res.policy


@pytest.mark.parametrize("num_beams", [1, 2])
def test_always_matches_gpu_only(ckpt, num_beams):
    eng = _engine(ckpt, cpu_compute="always")
    ids, mask = prompts()
    kw = dict(max_new_tokens=5, num_beams=num_beams, keep_logits=True)
    ref = eng.run(PolicySpec("gpu_only"), ids, mask, **kw)
    for name in CPU_POLICIES:
        for size in (0, 2):
            res = eng.run(PolicySpec(name, size, "lru"), ids, mask, **kw)
            _close(ref, res)
            m = res.metrics
            assert m["experts_cpu_computed"] > 0 and m["tokens_cpu_computed"] >= m["experts_cpu_computed"]
            assert m["cpu_compute"] == "always" and m["cpu_compute_active"] is True
            cal = m["cpu_compute_calibration"]
            assert cal["cpu_ms_1tok"] > 0 and cal["copy_GBps"] > 0 and cal["cpu_gemv_GBps"] > 0
            assert any("not graph-capturable" in n for n in res.notes)
    # on_demand without a cache: every miss is computed on the CPU, nothing is copied
    od = eng.run(PolicySpec("on_demand"), ids, mask, **kw).metrics
    assert od["experts_copied"] == 0 and od["hit_rate"] == 0.0


def test_speculative_always(tmp_path):
    eng = _engine(tiny_checkpoint(tmp_path / "plain", pregated=False), cpu_compute="always")
    ids, mask = prompts()
    kw = dict(max_new_tokens=5, keep_logits=True)
    ref = eng.run(PolicySpec("gpu_only"), ids, mask, **kw)
    res = eng.run(PolicySpec("speculative"), ids, mask, **kw)
    _close(ref, res)
    assert res.metrics["experts_cpu_computed"] > 0


def test_auto_follows_the_cost_model(ckpt):
    ids, mask = prompts()
    kw = dict(max_new_tokens=5, keep_logits=True)
    # a link far faster than any CPU: copying always wins; nothing changes, bitwise
    fast = _engine(ckpt, cpu_compute="auto", link_GBps=1e9)
    ref = fast.run(PolicySpec("gpu_only"), ids, mask, **kw)
    off = fast.run(PolicySpec("on_demand"), ids, mask, cpu_compute="off", **kw)
    for name in CPU_POLICIES:
        res = fast.run(PolicySpec(name), ids, mask, **kw)
        assert res.metrics["experts_cpu_computed"] == 0 and res.metrics["cpu_compute_active"] is False
        assert res.tokens == ref.tokens
        for a, b in zip(ref.step_logits, res.step_logits):
            assert torch.equal(a, b)
        assert any("copying predicted faster" in n for n in res.notes)
    assert fast.run(PolicySpec("on_demand"), ids, mask, **kw).metrics["experts_copied"] == off.metrics[
        "experts_copied"
    ]
    # a link far slower than the CPU (and no round trip): every miss is computed on the CPU
    slow = _engine(ckpt, cpu_compute="auto", link_GBps=1e-6, cpu_overhead_ms=0.0)
    res = slow.run(PolicySpec("on_demand"), ids, mask, **kw)
    _close(ref, res)
    assert res.metrics["experts_copied"] == 0 and res.metrics["experts_cpu_computed"] > 0


def test_cost_model_threshold():
    c = Calibration(
        expert_bytes=1000, dtype="float32", cpu_threads=1, cpu_ms_1tok=1.0, cpu_ms_per_extra_token=0.5,
        cpu_gemv_GBps=1e-3, copy_GBps=1e-3 / 4, copy_GBps_measured=None, copy_ms=4.0, overhead_ms=0.5,
        overhead_measured=False,
    )
    # cpu(n) = 1 + 0.5 (n - 1) + 0.5 < 4  <=>  n < 6
    assert c.cpu_wins(1) and c.cpu_wins(5) and not c.cpu_wins(6)
    assert c.max_tokens() == 5 and c.as_dict()["cpu_wins_up_to_tokens"] == 5


def test_bad_mode(ckpt):
    with pytest.raises(OffloadError, match="cpu_compute"):
        _engine(ckpt, cpu_compute="sometimes")


def test_main_job_reports_cpu_compute(tmp_path):
    from infer.app import run
    from tests.infer.test_app import _compose

    cfg = _compose(
        [
            "num_examples=2",
            "batch_size=2",
            "max_new_tokens=3",
            "max_input_tokens=64",
            "policies=[gpu_only,on_demand,pregated]",
            "offload.cpu_compute=always",
        ]
    )
    rep = run(cfg, tmp_path)
    cal = rep["environment"]["cpu_compute_calibration"]
    assert cal["cpu_ms_1tok"] > 0 and "cpu_wins_up_to_tokens" in cal
    for e in rep["entries"]:
        assert e["same_as_gpu_only"] is True, e["policy"]
        if e["policy"] != "gpu_only":
            assert e["metrics"]["experts_cpu_computed"] > 0 and e["metrics"]["cpu_compute"] == "always"
    assert "cpu experts" in rep["table"]
