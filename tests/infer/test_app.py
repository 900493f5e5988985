"""`python -m infer` (Hydra app) and scripts/bench_e2e.py --tiny, end to end on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infer.app import policy_specs, run

ROOT = Path(__file__).resolve().parents[2]


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from infer.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="infer", overrides=overrides)


def test_overrides_compose():
    cfg = _compose(
        [
            "policies=[gpu_only,on_demand,prefetch_all,pregated]",
            "cache.size=2",
            "cache.kind=lfu",
            "batch_size=2",
            "num_beams=2",
            "max_input_tokens=64",
            "max_new_tokens=4",
            "logger=none",
            "data=docsum",
            "model=tiny",
        ]
    )
    assert [s.label for s in policy_specs(cfg)] == [
        "gpu_only",
        "on_demand@lfu2",
        "prefetch_all@lfu2",
        "pregated@lfu2",
    ]
    assert [s.label for s in policy_specs(_compose(["policy=pregated"]))] == ["pregated"]
    assert len(policy_specs(_compose([]))) >= 5  # the default compares every policy
    with pytest.raises(Exception, match="sizee"):  # noqa: B017
        _compose(["cache.sizee=2"])  # a misspelt key fails at start


def test_main_job_on_the_shipped_model(tmp_path):
    """The main job's path on the shipped trained model (fewer examples and tokens, to stay quick)."""
    cfg = _compose(
        [
            "num_examples=4",
            "batch_size=2",
            "max_new_tokens=6",
            "policies=[gpu_only,on_demand,on_demand@lru2,prefetch_all,pregated,pregated@lfu2]",
        ]
    )
    rep = run(cfg, tmp_path)
    assert rep["environment"]["compute_device"] == "cpu" and "CPU-only" in rep["environment"]["note"]
    # the default offload.compress=auto packs only experts that cross a link to a GPU
    assert rep["environment"]["expert_compress"] == "none"
    assert rep["environment"]["expert_compress_setting"] == ("offload.compress=auto: none (the experts are not "
                                                             "copied to a GPU)")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "policies.png").stat().st_size > 0
    assert [e["policy"] for e in saved["entries"]][:2] == ["gpu_only", "on_demand"]
    for e in saved["entries"]:
        assert e["same_as_gpu_only"] is True, e["policy"]
        assert len(e["tokens"]) == 4
        assert "rougeL" in e["quality"]
        assert e["metrics"]["peak_allocated_bytes"] is None  # no GPU figures on a CPU machine
    assert "ms/tok med" in saved["table"]


def test_cli_runs_with_beams(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "infer",
            "policy=pregated",
            "num_examples=2",
            "batch_size=2",
            "num_beams=2",
            "max_new_tokens=3",
            "max_input_tokens=64",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pregated" in out.stdout and (tmp_path / "report.json").exists()


def test_bench_script_tiny(tmp_path):
    out = subprocess.run(
        [sys.executable, "scripts/bench_e2e.py", "--tiny", "--quick", "--no-anchors", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={"BENCH_THREADS": "1", **_env()},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "e2e-cpu-tiny.json").read_text())
    runs = res["shapes"]["tiny"]["runs"]
    assert runs and all(r.get("same_tokens_as_gpu_only") for r in runs if "metrics" in r)
    assert not res["failures"]
    assert (tmp_path / "e2e-cpu-tiny.png").exists()
    # --tiny sweeps batches 1 and 2 (greedy, every policy), with the crossover and copy accounting
    sw = res["shapes"]["tiny"]["batch_sweep"]
    assert [p["batch"] for p in sw["points"]] == [1, 2]
    for p in sw["points"]:
        assert set(p["runs"]) == {"gpu_only", "on_demand", "prefetch_all", "pregated"}
        assert all(r.get("same_tokens_as_gpu_only") for n, r in p["runs"].items() if n != "gpu_only")
        assert p["runs"]["pregated"]["copy"]["decode_bytes_per_step"] > 0
    assert "crossover_batch" in sw and set(sw["on_demand_over_pregated"]) == {"1", "2"}
    # greedy batch 1 copies one expert per decoder MoE block per step, and one more where the first-block
    # guess missed
    tiny = res["shapes"]["tiny"]
    pg = next(r for r in runs if r["label"] == "pregated/greedy/pregated")
    n_dec, eb = tiny["config"]["decoder_moe_blocks"], tiny["expert_bytes"]
    assert n_dec * eb <= pg["copy"]["decode_bytes_per_step"] <= (n_dec + 1) * eb
    assert (tmp_path / "e2e-cpu-tiny-batch.png").exists()
    _ = torch


def _env():
    import os

    return dict(os.environ)


def test_default_model_is_built_by_training_when_missing(tmp_path):
    """No shipped model: the runner trains one with `python -m train` (2 steps here) and serves it."""
    from infer.app import default_checkpoint

    cfg = _compose([f"default_model.dir={tmp_path / 'built'}", "default_model.train_steps=2"])
    cfg.default_model.train_overrides = [
        "eval.at_start=false",
        "eval.test=false",
        "train.eval_every=0",
        "train.batch_size=4",
    ]
    path = default_checkpoint(cfg)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert not (path / "training_state.pt").exists()
    assert default_checkpoint(cfg) == path  # second call: found, not rebuilt


def test_cache_size_auto(tmp_path):
    """cache.size=auto sizes every CPU policy's cache from the memory budget (here cache.budget_gb on the
    CPU), capped at the number of experts; a bad value fails naming the key."""
    from infer.app import cache_size_setting, policy_specs
    from models.checkpoint import load_config

    mcfg = load_config(ROOT / "checkpoints" / "default")
    n_moe = mcfg.num_sparse_encoder_layers + mcfg.num_sparse_decoder_layers
    per_slot = n_moe * mcfg.expert_bytes(4)  # fp32 on the CPU
    budget_gb = 3.5 * per_slot / 1e9  # room for 3 slots per block
    cfg = _compose(["num_examples=2", "batch_size=2", "max_new_tokens=4", "policies=[gpu_only,on_demand,pregated]",
                    "cache.size=auto", f"cache.budget_gb={budget_gb}"])
    rep = run(cfg, tmp_path)
    sizes = {e["policy"]: e["spec"]["cache_size"] for e in rep["entries"]}
    assert sizes == {"gpu_only": 0, "on_demand@lru3": 3, "pregated@lru3": 3}, sizes
    assert "3 slots" in rep["environment"]["cache_auto"]
    assert all(e["same_as_gpu_only"] for e in rep["entries"])
    # a budget beyond every expert is capped at E
    big = _compose(["cache.size=auto", f"cache.budget_gb={1000 * budget_gb}"])
    from infer.app import auto_cache_size
    from infer.offload import ExpertStore

    store = ExpertStore(mcfg, n_moe, torch.float32, None, pin=False)
    assert auto_cache_size(big, store, torch.device("cpu"))[0] == mcfg.num_experts
    assert auto_cache_size(_compose(["cache.size=auto"]), store, torch.device("cpu"))[0] == 0  # CPU, no budget
    # a compressed store's slot: its unpacked bf16 row plus a packed landing row (not the packed chunk alone)
    packed = ExpertStore(mcfg, n_moe, torch.bfloat16, None, pin=False, compress="exp4")
    slot = packed.slot_bytes + packed.expert_bytes
    three = _compose(["cache.size=auto", f"cache.budget_gb={3.5 * n_moe * slot / 1e9}"])
    size, why = auto_cache_size(three, packed, torch.device("cpu"))
    assert size == 3 and f"x {slot / 1e6:.1f} MB" in why
    assert cache_size_setting("auto") == "auto" and cache_size_setting(4) == 4
    for bad in ("big", -1, 2.5):
        with pytest.raises(ValueError, match="cache.size"):
            policy_specs(_compose([f"cache.size={bad}"]))


def test_bad_copy_setting_fails_before_any_run(tmp_path):
    """offload.copy_priority / copy_programs / copy_block / copy_warps / dma_api / first_block_guess are checked
    before the model is loaded, with the key and the accepted values in the message."""
    import infer.app as app
    from infer.offload import OffloadError

    def no_load(*a, **k):  # pragma: no cover - reached only if the check came too late
        raise AssertionError("the model was loaded before the copy settings were checked")

    for bad, key in (("offload.copy_priority=urgent", "copy_priority"), ("offload.copy_block=1000", "copy_block"),
                     ("offload.copy_warps=3", "copy_warps"), ("offload.copy_programs=0", "copy_programs"),
                     ("offload.dma_api=cuda", "dma_api"), ("offload.first_block_guess=always", "first_block_guess")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(app, "load_offloaded", no_load)
            with pytest.raises(OffloadError, match=key):
                run(_compose([bad, "num_examples=1", "max_new_tokens=1", "logger=none"]), tmp_path)
    assert not list(tmp_path.glob("**/report.json"))


def test_bad_quantize_fails_before_the_checkpoint_is_read(tmp_path, monkeypatch):
    import models.checkpoint
    from infer.offload import OffloadError

    def no_read(*a, **k):  # pragma: no cover - reached only if the check came too late
        raise AssertionError("the checkpoint was read before offload.quantize was checked")

    monkeypatch.setattr(models.checkpoint, "load_config", no_read)
    with pytest.raises(OffloadError, match="offload.quantize='int4'; expected none or int8"):
        run(_compose(["offload.quantize=int4", "num_examples=1", "max_new_tokens=1", "logger=none"]), tmp_path)


def test_copy_mode_dma_asks_for_eager_kernel_loading_first(tmp_path, monkeypatch):
    """offload.copy_mode=dma with a Python copier thread (dma_api driver or torch) sets CUDA_MODULE_LOADING=EAGER
    before anything touches CUDA (where nothing chose a mode yet); other copy modes, and dma with the native loop
    (which needs no GIL, so no eager loading), leave it alone."""
    import os

    import infer.app as app

    seen = []

    def stop(name):  # the app's first device step: what the environment says by then
        seen.append(os.environ.get("CUDA_MODULE_LOADING"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(app, "resolve_device", stop)
    monkeypatch.setenv("CUDA_MODULE_LOADING", "")  # (restored to the test's own environment afterwards)
    from infer import native_copier

    native = None if native_copier.usable("native") else "EAGER"  # (where it cannot build: a Python thread)
    for mode, api, want in (("device", "native", None), ("dma", "native", native), ("dma", "driver", "EAGER"),
                            ("dma", "torch", "EAGER")):
        monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)
        with pytest.raises(RuntimeError, match="stop here"):
            run(_compose([f"offload.copy_mode={mode}", f"offload.dma_api={api}", "num_examples=1", "max_new_tokens=1",
                          "logger=none"]), tmp_path)
        assert seen[-1] == want, (mode, api)


def test_bad_expv_min_mib_fails_before_loading(tmp_path, monkeypatch):
    import infer.app as app

    def no_load(*a, **k):  # pragma: no cover - reached only if the check came too late
        raise AssertionError("the model was loaded before offload.expv_min_mib was checked")

    monkeypatch.setattr(app, "load_offloaded", no_load)
    with pytest.raises(ValueError, match=r"offload.expv_min_mib=-1.0: expected MiB >= 0"):
        run(_compose(["offload.expv_min_mib=-1", "num_examples=1", "max_new_tokens=1", "logger=none"]), tmp_path)
