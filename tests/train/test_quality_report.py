"""Issue #7's study: the recipes compose (and describe the sizes the issue asks for), and
scripts/quality_report.py runs the whole pipeline end to end on a tiny model with 4 MoE blocks per
stack (pretrain -> fine-tune grid through `python -m train` -> quality.json/md/png), resumes, and
aggregates correctly. ~45 s on 2 CPU cores."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import train.config
from models.config import PRESETS, config_from_conf
from models.switch import Switch

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT / "scripts"))

import quality_report  # noqa: E402


def _compose(overrides):
    train.config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _effective(experiment, overrides=()):
    """The config `python -m train` runs for the command quality_report.py builds."""
    cmd = quality_report.train_command(experiment, list(overrides), Path("/tmp/x"))
    args = cmd[cmd.index("train") + 1 :]
    return _compose([a for a in args if not a.startswith("hydra.")])


def _params(cfg_model):
    with torch.device("meta"):
        m = Switch(config_from_conf(cfg_model))
    return sum(p.numel() for p in m.parameters()), len(m.encoder.moes), len(m.decoder.moes)


# The issue: small "about 20-40M", medium "about 100-200M". small is 19.0M so that its int8 weights
# (the shipped default model, scripts/ship_default.py) stay under the 20 MB a shipped model may take.
@pytest.mark.parametrize("name, lo, hi, min_experts", [("small", 18.5e6, 40e6, 8), ("medium", 100e6, 200e6, 32)])
def test_pretrain_recipes_compose_and_hit_the_sizes(name, lo, hi, min_experts):
    cfg = _effective([f"experiment=pretrain_{name}"])
    n, enc, dec = _params(cfg.model)
    assert lo <= n <= hi, f"{name}: {n / 1e6:.1f}M parameters"
    assert cfg.model.num_experts >= min_experts and (name != "small" or cfg.model.num_experts == 8)
    assert enc >= 4 and dec >= 4  # lookahead 3 leaves pre-gates
    assert cfg.data.name == "span" and cfg.pregate.enabled is False and cfg.init.checkpoint is None
    assert cfg.train.max_steps == 2000
    assert cfg.train.batch_size == 64 and cfg.train.precision == "auto"
    # the Switch paper's load-balancing weight for medium (HF's 0.001 collapsed its encoder routing)
    assert cfg.model.router_aux_loss_coef == {"small": 0.001, "medium": 0.01}[name]
    assert cfg.train.max_input_len == 512 and cfg.model.dropout_rate == 0.1 and cfg.optim.schedule == "cosine"


def test_finetune_recipe_is_the_same_for_every_variant():
    base = ["init.checkpoint=/ckpt", "data=docsum", "seed=1"]
    cfgs = {
        v: _effective(["experiment=quality_finetune"], base + quality_report.variant_overrides(v))
        for v in quality_report.VARIANTS
    }
    conv = cfgs["conventional"]
    assert conv.pregate.enabled is False and conv.train.max_steps == 400 and conv.train.batch_size == 32
    assert conv.optim.lr == 3e-4 and conv.optim.schedule == "constant" and conv.eval.at_start is True
    assert conv.init.checkpoint == "/ckpt" and conv.data.name == "docsum" and conv.data.seed == 1
    for v, c in cfgs.items():
        if v != "conventional":
            assert c.pregate.enabled is True and c.model.lookahead == int(v[-1])
        for k in ("train", "optim", "eval", "data", "init"):
            assert c[k] == conv[k], (v, k)
    assert _compose(["experiment=quality_finetune", "data=span"]).data.name == "span"


def test_experiment_alone_sets_its_train_keys():
    cfg = _compose(["experiment=pretrain_small"])
    assert cfg.train.max_steps == 2000 and cfg.train.batch_size == 64


@pytest.mark.parametrize("name", ["small", "medium"])
def test_model_yaml_mirrors_preset(name):
    cfg = _compose([f"model={name}"])
    for k, v in PRESETS[name].items():
        assert cfg.model[k] == v, k


# -- the pipeline, end to end -------------------------------------------------------------------------
TINY4 = ["model.num_sparse_encoder_layers=4", "model.num_sparse_decoder_layers=4"]
SMALL_RUN = [
    "train.batch_size=4",
    "train.max_input_len=64",
    "train.max_target_len=32",
    "eval.max_examples=8",
    "eval.batch_size=8",
]


def _report(tmp_path, *args):
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "quality_report.py"),
        "--models",
        "tiny",
        "--root",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "quality.json"),
        "--jobs",
        "2",
        "--threads",
        "1",
        "--gpus",
        "",
        *args,
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout, json.loads((tmp_path / "quality.json").read_text())


def test_dry_run_prints_the_grid(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "quality_report.py"),
            "--dry-run",
            "--pretrain",
            "--root",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stdout.splitlines() if " -m train " in x]
    assert len(lines) == 2 + 2 * 2 * 4 * 3  # pretrain small, medium + models x tasks x variants x seeds
    assert sum("experiment=pretrain_medium" in x for x in lines) == 1
    assert sum("model.lookahead=3" in x and "pregate.enabled=true" in x for x in lines) == 2 * 2 * 3
    assert not (tmp_path / "finetune").exists()


def test_pipeline_end_to_end(tmp_path):
    pre = [*TINY4, "train.max_steps=4", "train.eval_every=2", *SMALL_RUN]
    ft = [*SMALL_RUN, "eval.generate_examples=4", "eval.max_new_tokens=4"]
    common = ["--steps", "3", "--override", *ft, "--pretrain-override", *pre]
    # 1: pretrain, then both tasks x {conventional, L3}, seed 0
    out, rep = _report(
        tmp_path,
        "--pretrain",
        "--seeds",
        "0",
        "--variants",
        "conventional",
        "pregated-L3",
        *common,
    )
    assert rep["runs"]["finished"] == 4 and not rep["runs"]["failed"]
    p = rep["pretrain"]["tiny"]
    assert p["steps"] == 4 and [s for s, _ in p["validation_curve"]] == [0, 2, 4] and p["parameters"] > 0
    cells = {(c["task"], c["variant"]): c for c in rep["results"]}
    assert set(cells) == {(t, v) for t in ("span", "docsum") for v in ("conventional", "pregated-L3")}
    for (t, v), c in cells.items():
        assert c["headline"]["metric"] == ("test/loss" if t == "span" else "test/rougeL")
        assert c["steps"] == [3] and c["num_experts"] == 8
        assert set(c["load_max_over_mean"]) == {f"{s}{m}" for s in ("encoder", "decoder") for m in range(4)}
        assert all(1.0 <= b["mean"] <= 8.0 for b in c["load_max_over_mean"].values())
        assert all(0.0 <= b["mean"] <= 1.0 for b in c["load_entropy"].values())
        if v == "conventional":
            assert "agreement_at_conversion" not in c
            continue
        L = int(v[-1])
        # the blocks routed by a pre-gate: MoE blocks L..3 of each stack
        want = {f"{s}{m}" for s in ("encoder", "decoder") for m in range(L, 4)}
        assert set(c["agreement_at_conversion"]) == want == set(c["agreement_after_finetune"])
        assert all(0 <= b["mean"] <= 100 for b in c["agreement_at_conversion"].values())
        assert "rel_diff_pct" in c["vs_conventional"]
    assert rep["lookahead1_target"] == []  # no L1 runs yet
    assert (tmp_path / "quality.png").stat().st_size > 0 and "| tiny | span | pregated-L3 |" in out
    assert rep["lookahead_trend"] == []  # one lookahead only
    # the shipped-model candidate keeps its weights; the others only their config and metrics
    runs = tmp_path / "runs" / "finetune" / "tiny"
    assert not (runs / "span" / "conventional" / "seed0" / "checkpoint" / "model.safetensors").exists()
    assert not (runs / "span" / "conventional" / "seed0" / "checkpoint" / "training_state.pt").exists()
    assert (tmp_path / "runs" / "pretrain" / "tiny" / "checkpoint" / "model.safetensors").exists()

    # 2: span, conventional, seeds {0, 1}: the finished run is skipped, 1 new one runs
    out, _ = _report(tmp_path, "--seeds", "0", "1", "--tasks", "span", "--variants", "conventional", *common)
    assert "1 runs to do" in out
    # 3: the report alone, with a seed that was never run for L3
    out, rep2 = _report(
        tmp_path,
        "--aggregate-only",
        "--seeds",
        "0",
        "1",
        "--tasks",
        "span",
        "--variants",
        "conventional",
        "pregated-L3",
        *common,
    )
    assert "runs to do" not in out and rep2["runs"]["finished"] == 3
    c2 = {c["variant"]: c for c in rep2["results"]}
    conv, l3 = c2["conventional"], c2["pregated-L3"]
    assert l3["missing_seeds"] == [1] and l3["headline"]["n"] == 1 and l3["headline"]["std"] == 0.0
    # aggregation recomputed by hand from the run dirs
    vals = [
        json.loads((runs / "span" / "conventional" / f"seed{s}" / "metrics.json").read_text())["test"]["loss"]
        for s in (0, 1)
    ]
    mean, std = statistics.mean(vals), statistics.stdev(vals)
    assert conv["headline"]["values"] == vals and conv["seeds"] == [0, 1]
    assert math.isclose(conv["headline"]["mean"], mean, rel_tol=1e-12)
    assert math.isclose(conv["headline"]["std"], std, rel_tol=1e-9)
    m3 = json.loads((runs / "span" / "pregated-L3" / "seed0" / "metrics.json").read_text())
    rel = 100 * (m3["test"]["loss"] - mean) / mean
    assert math.isclose(l3["vs_conventional"]["rel_diff_pct"], rel, rel_tol=1e-9)
    assert math.isclose(l3["vs_conventional"]["quality_change_pct"], -rel, rel_tol=1e-9)  # loss: lower is better
    assert math.isclose(l3["vs_conventional"]["seed_spread"], std, rel_tol=1e-9)
    step0 = next(h for h in m3["history"] if h["split"] == "validation" and h["step"] == 0)
    assert l3["agreement_at_conversion"]["encoder3"]["values"] == [step0["agreement/encoder3"]]
    assert l3["agreement_after_finetune"]["decoder3"]["values"] == [m3["validation"]["agreement/decoder3"]]
    m0 = json.loads((runs / "span" / "conventional" / "seed0" / "metrics.json").read_text())
    assert conv["load_max_over_mean"]["encoder0"]["values"][0] == pytest.approx(
        8 * m0["validation"]["load_max/encoder0"]
    )
    assert rep2["machine"]["torch"] == torch.__version__ and "quality_report.py" in rep2["command"]


def _fake_run(d, test, agree0, agree1, E=8):
    d.mkdir(parents=True)
    val = {"loss": 1.0, "agreement/encoder1": agree1, "load_max/encoder0": 0.25, "load_entropy/encoder0": 0.9}
    hist = [{"step": 0, "split": "validation", "agreement/encoder1": agree0}]
    (d / "metrics.json").write_text(
        json.dumps(
            {
                "step": 10,
                "stopped": False,
                "train_seconds": 1.0,
                "test": test,
                "validation": val,
                "history": hist,
            }
        )
    )
    (d / "checkpoint").mkdir()
    (d / "checkpoint" / "config.json").write_text(json.dumps({"num_experts": E}))


def test_aggregation_targets_and_trend(tmp_path):
    """The lookahead-1 target and the lookahead trend on made-up runs (no training)."""
    rouge = {
        "conventional": [30.0, 31.0, 32.0],
        "pregated-L1": [30.9, 31.0, 31.1],
        "pregated-L2": [30.0, 30.5, 31.0],
        "pregated-L3": [28.0, 28.5, 29.0],
    }
    for v, xs in rouge.items():
        for s, x in enumerate(xs):
            _fake_run(
                tmp_path / "finetune" / "m" / "docsum" / v / f"seed{s}",
                {"rougeL": x, "loss": 2.0},
                50.0,
                80.0,
            )
    a = quality_report.parse(["--models", "m", "--tasks", "docsum", "--root", str(tmp_path), "--aggregate-only"])
    rep = quality_report.aggregate([], {}, a)
    (k,) = rep["lookahead1_target"]
    assert math.isclose(k["quality_change_pct"], 100 * (31.0 - 31.0) / 31.0, abs_tol=1e-9) and k["pass"]
    c = {x["variant"]: x for x in rep["results"]}
    assert math.isclose(c["pregated-L3"]["vs_conventional"]["quality_change_pct"], 100 * (28.5 - 31) / 31)
    assert math.isclose(c["pregated-L1"]["headline"]["std"], 0.1) and c["conventional"]["headline"]["std"] == 1.0
    assert (
        c["pregated-L2"]["agreement_at_conversion_mean"] == 50.0
        and c["pregated-L2"]["agreement_after_finetune_mean"] == 80.0
    )
    assert c["conventional"]["load_max_over_mean"]["encoder0"]["mean"] == 2.0
    (t,) = rep["lookahead_trend"]
    assert t["headline_means"] == [31.0, 30.5, 28.5] and t["declines_with_lookahead"]
    assert "PASS" in quality_report.markdown(rep)


def test_scheduler_starts_pretraining_first(tmp_path, monkeypatch):
    """With every slot wanted by ready fine-tunes, a pretraining run that others wait on still
    starts in the first wave (it is the critical path)."""
    import argparse
    import json as _json

    started: list[str] = []

    class FakeProc:
        def __init__(self, cmd, **kw):
            self.run_dir = Path(next(c.split("=", 1)[1] for c in cmd if c.startswith("hydra.run.dir=")))
            started.append(self.run_dir.name)
            self.returncode = None

        def poll(self):
            (self.run_dir / "metrics.json").write_text(_json.dumps({"stopped": False}))
            self.returncode = 0
            return 0

        def send_signal(self, sig):  # pragma: no cover - no time budget here
            pass

    monkeypatch.setattr(quality_report.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(
        quality_report.Job, "build", lambda self: setattr(self, "cmd", [f"hydra.run.dir={self.run_dir}"])
    )
    J = quality_report.Job
    jobs = [J(f"ftA{i}", tmp_path / f"ftA{i}", [], []) for i in range(4)]
    jobs.append(J("preB", tmp_path / "preB", [], []))
    jobs.append(J("ftB", tmp_path / "ftB", [], [], after=tmp_path / "preB"))
    a = argparse.Namespace(jobs=2, gpus="", threads=1, time_budget=0, grace=0, keep_checkpoints=False)
    quality_report.execute(jobs, a)
    assert "preB" in started[:2], started
    assert started.index("ftB") > started.index("preB")
    assert sorted(started) == sorted(j.run_dir.name for j in jobs)


def test_mps_absent_falls_back(tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert quality_report.start_mps(tmp_path) is None
    assert "time-slice" in capsys.readouterr().out


def test_param_count_from_config_when_weights_dropped(tmp_path):
    """The committed run records keep config.json but no weights: the parameter count comes from it."""
    from models.checkpoint import save_switch
    from models.config import preset
    from models.pregate import convert_to_pregated

    m = Switch(preset("tiny"))
    convert_to_pregated(m, 1)
    save_switch(m, tmp_path / "ck")
    with_weights = quality_report.param_count(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    assert with_weights == sum(p.numel() for p in m.parameters())
    assert quality_report.param_count(tmp_path / "ck") == with_weights
    assert quality_report.param_count(tmp_path / "missing") is None
