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
    # medium: batch 256 (batch 64 had not flattened in 2,000 steps; the step is launch-bound)
    assert (cfg.train.max_steps, cfg.train.batch_size) == {"small": (2000, 64), "medium": (2000, 256)}[name]
    assert cfg.train.precision == "auto"
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
    pre = [*TINY4, "train.max_steps=4", "train.eval_every=2", "train.keep_best=true", *SMALL_RUN]
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
    # the pretraining kept its best-validation weights (train.keep_best): the fine-tunes start from them
    best = min(p["validation_curve"][1:], key=lambda sv: sv[1])
    assert p["finetunes_start_from"] == {"checkpoint": "best", "step": best[0], "validation_loss": best[1]}
    assert p["recipe"]["keep_best"] and not p["recipe"]["remask_each_epoch"]
    assert p["long_enough"] == (p["flattened"] or p["stopped_improving"])
    ov = (tmp_path / "runs" / "finetune" / "tiny" / "span" / "conventional" / "seed0" / ".hydra" / "overrides.yaml")
    assert f"init.checkpoint={(tmp_path / 'runs' / 'pretrain' / 'tiny' / 'best').resolve()}" in ov.read_text()
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


def test_pretraining_data_parallel_under_torchrun(tmp_path):
    # --pretrain-nproc 2: the pretraining runs under torchrun (2 gloo CPU processes here, DDP), with the
    # remasked epochs, best-weights and early-stop machinery of the medium recipe
    pre = [*TINY4, "train.max_steps=4", "train.eval_every=2", "train.keep_best=true", "train.early_stop_evals=3",
           "data.remask_each_epoch=true", *SMALL_RUN]
    args = ["--pretrain", "--pretrain-only", "--pretrain-nproc", "2", "--pretrain-override", *pre]
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quality_report.py"), "--dry-run", "--models", "tiny",
         "--root", str(tmp_path / "runs"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 0, p.stderr
    want = " -m torch.distributed.run --nproc_per_node=2 --standalone -m train experiment=pretrain_small model=tiny"
    assert want in p.stdout
    _, rep = _report(tmp_path, *args)
    m = json.loads((tmp_path / "runs" / "pretrain" / "tiny" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["step"] == 4 and not m["stopped"]
    assert (tmp_path / "runs" / "pretrain" / "tiny" / "best" / "model.safetensors").exists()
    assert rep["pretrain"]["tiny"]["finetunes_start_from"]["checkpoint"] == "best"
    # more processes than GPUs: a clear error before anything runs
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quality_report.py"), "--models", "tiny", "--gpus", "0",
         "--root", str(tmp_path / "other"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert p.returncode != 0 and "--pretrain-nproc 2 needs that many GPUs" in p.stderr


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


def test_scheduler_retries_a_run_that_ran_out_of_gpu_memory_with_fewer_at_a_time(tmp_path, monkeypatch, capsys):
    """A run whose log ends in a CUDA out-of-memory error goes back in the queue (it resumes), and from then
    on at most as many runs as were running beside it start at a time; any other failure stays a failure."""
    import argparse
    import json as _json

    running: set[str] = set()
    peak_after_oom: list[int] = []
    oom_seen = []
    attempts: dict[str, int] = {}

    class FakeProc:
        def __init__(self, cmd, stdout=None, **kw):
            self.run_dir = Path(next(c.split("=", 1)[1] for c in cmd if c.startswith("hydra.run.dir=")))
            self.name = self.run_dir.name
            attempts[self.name] = attempts.get(self.name, 0) + 1
            running.add(self.name)
            if oom_seen:
                peak_after_oom.append(len(running))
            self.returncode, self.polls = None, 0

        def poll(self):
            self.polls += 1
            if self.polls < 3:  # runs overlap for a few scheduler rounds
                return None
            running.discard(self.name)
            if self.name == "ft0" and attempts["ft0"] == 1:
                (self.run_dir / "train.log").write_text("...\ntorch.OutOfMemoryError: CUDA out of memory. Tried\n")
                oom_seen.append(True)
                self.returncode = 1
            elif self.name == "ft3":
                (self.run_dir / "train.log").write_text("ValueError: a bug\n")
                self.returncode = 1
            else:
                (self.run_dir / "metrics.json").write_text(_json.dumps({"stopped": False}))
                self.returncode = 0
            return self.returncode

    monkeypatch.setattr(quality_report.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(quality_report.time, "sleep", lambda s: None)
    monkeypatch.setattr(
        quality_report.Job, "build", lambda self: setattr(self, "cmd", [f"hydra.run.dir={self.run_dir}"])
    )
    J = quality_report.Job
    jobs = [J(f"ft{i}", tmp_path / f"ft{i}", [], []) for i in range(6)]
    a = argparse.Namespace(jobs=3, gpus="", threads=1, time_budget=0, grace=0, keep_checkpoints=False)
    quality_report.execute(jobs, a)
    st = {j.name: j.status for j in jobs}
    assert st["ft0"] == "done" and attempts["ft0"] == 2 and jobs[0].oom_retries == 1
    assert st["ft3"] == "failed" and attempts["ft3"] == 1  # not an OOM: not retried
    assert all(st[f"ft{i}"] == "done" for i in (1, 2, 4, 5))
    assert peak_after_oom and max(peak_after_oom) <= 2  # ft0 ran beside two others: 2 at a time after
    assert "out of GPU memory: ft0 goes back in the queue" in capsys.readouterr().out


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


# -- runs that diverged (non-finite metrics) ----------------------------------------------------------
def _fake_span_run(root, variant, seed, loss, agree1=80.0, nonfinite_steps=None):
    """A finished span run whose test loss is `loss` (NaN: it diverged, as the medium study's did:
    token accuracy 0, every token on one expert, agreement 100)."""
    d = root / "finetune" / "m" / "span" / variant / f"seed{seed}"
    bad = not math.isfinite(loss)
    _fake_run(d, {"loss": loss, "token_accuracy": 0.0 if bad else 40.0 + seed}, 50.0, 100.0 if bad else agree1)
    m = json.loads((d / "metrics.json").read_text())
    m["validation"]["loss"] = loss
    m["validation"]["load_max/encoder0"] = 1.0 if bad else 0.25
    if nonfinite_steps is not None:
        m["nonfinite_steps"] = nonfinite_steps
    (d / "metrics.json").write_text(json.dumps(m))  # NaN is written as the NaN literal, as train does


def _span_report(root, variants=quality_report.VARIANTS):
    a = quality_report.parse(
        ["--models", "m", "--tasks", "span", "--variants", *variants, "--root", str(root), "--aggregate-only"]
    )
    return quality_report.aggregate([], {}, a)


NAN = float("nan")


def test_diverged_seed_is_left_out_of_the_row(tmp_path):
    """1 of 3 seeds diverged: every statistic of the row is over the 2 finite seeds, and the row says so."""
    for s, x in enumerate([2.0, NAN, 2.2]):
        _fake_span_run(tmp_path, "conventional", s, x)
    rep = _span_report(tmp_path, ["conventional"])
    (c,) = rep["results"]
    assert c["seeds"] == [0, 1, 2] and c["n_runs"] == 3 and c["n_finite"] == 2 and c["diverged_seeds"] == [1]
    assert c["headline"]["values"] == [2.0, 2.2] and c["headline"]["n"] == 2
    assert math.isclose(c["headline"]["mean"], 2.1) and math.isclose(c["headline"]["std"], statistics.stdev([2.0, 2.2]))
    acc = c["metrics"]["test/token_accuracy"]
    assert acc["values"] == [40.0, 42.0] and acc["mean"] == 41.0  # not dragged down by the diverged 0
    assert c["metrics"]["validation/loss"]["values"] == [2.0, 2.2]
    assert c["load_max_over_mean"]["encoder0"]["values"] == [2.0, 2.0]  # the collapsed 8.0 is left out
    assert rep["runs"]["diverged"] == ["m/span/conventional/seed1"] and rep["runs"]["finished"] == 3
    md = quality_report.markdown(rep)
    assert "| loss 2.100 ± 0.141 (2 of 3 seeds; 1 diverged) | - | 41.00 ± 1.41 (n=2) |" in md
    assert "nan" not in md.lower()
    # quality.json as main() writes it
    assert quality_report.main(
        ["--models", "m", "--tasks", "span", "--variants", "conventional", "--root", str(tmp_path),
         "--aggregate-only", "--out", str(tmp_path / "q" / "quality.json")]
    ) == 0
    (j,) = json.loads((tmp_path / "q" / "quality.json").read_text(), parse_constant=pytest.fail)["results"]
    assert (j["n_runs"], j["n_finite"], j["diverged_seeds"]) == (3, 2, [1])
    assert "(2 of 3 seeds; 1 diverged)" in (tmp_path / "q" / "quality.md").read_text()


def test_one_finite_seed_and_fully_diverged_row(tmp_path):
    for s, x in enumerate([NAN, NAN, 2.279]):
        _fake_span_run(tmp_path, "conventional", s, x)
    for s in range(3):
        _fake_span_run(tmp_path, "pregated-L1", s, float("inf") if s == 2 else NAN)
    rep = _span_report(tmp_path, ["conventional", "pregated-L1"])
    c = {x["variant"]: x for x in rep["results"]}
    conv, l1 = c["conventional"], c["pregated-L1"]
    assert conv["headline"]["values"] == [2.279] and conv["diverged_seeds"] == [0, 1]
    assert (l1["n_runs"], l1["n_finite"], l1["diverged_seeds"]) == (3, 0, [0, 1, 2])
    assert l1["headline"]["n"] == 0 and l1["metrics"] == {} and l1["vs_conventional"] is None
    assert l1["agreement_after_finetune_mean"] is None and l1["load_max_over_mean_worst_block"] is None
    md = quality_report.markdown(rep)
    assert "| m | span | conventional | loss 2.279 (1 of 3 seeds; 2 diverged) | - |" in md
    assert "| m | span | pregated-L1 | loss diverged (3 of 3 seeds) | - | - | - | - |" in md
    (k,) = rep["lookahead1_target"]
    assert not k["judged"] and k["pass"] is None and k["n_finite"] == [1, 0]
    assert "not judged: conventional: 2 of 3 seeds diverged (seeds 0, 1); pregated-L1: 3 of 3" in md
    assert "PASS" not in md and "FAIL" not in md and "nan" not in md.lower()
    quality_report.plot(rep, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_verdicts_are_not_judged_over_a_diverged_seed(tmp_path):
    """One diverged seed in a compared row: the lookahead-1 target and the trend are not judged, though
    the finite seeds alone would pass; the Δ column says it is over the finite seeds."""
    losses = {
        "conventional": [2.0, 2.0, 2.0],
        "pregated-L1": [2.0, NAN, 2.0],
        "pregated-L2": [2.1, 2.1, 2.1],
        "pregated-L3": [2.2, 2.2, 2.2],
    }
    for v, xs in losses.items():
        for s, x in enumerate(xs):
            _fake_span_run(tmp_path, v, s, x)
    rep = _span_report(tmp_path)
    (k,) = rep["lookahead1_target"]
    assert k == {
        "model": "m",
        "task": "span",
        "judged": False,
        "why": "pregated-L1: 1 of 3 seeds diverged (seed 1)",
        "quality_change_pct_finite_seeds": 0.0,
        "pass": None,
        "n_seeds": [3, 3],
        "n_finite": [3, 2],
    }
    (t,) = rep["lookahead_trend"]
    assert not t["judged"] and t["declines_with_lookahead"] is None and t["headline_means"] == [2.0, 2.1, 2.2]
    md = quality_report.markdown(rep)
    assert "- m/span: pre-gated L=1 vs conventional not judged: pregated-L1: 1 of 3 seeds diverged (seed 1)" in md
    assert "- m/span: lookahead 1, 2, 3 trend not judged: pregated-L1: 1 of 3 seeds diverged (seed 1)" in md
    assert "| +0.00% (finite seeds) |" in md and "| +5.00% |" in md
    assert "PASS" not in md and "FAIL" not in md and "declines" not in md
    # the same with every seed finite: judged as before
    for v, xs in losses.items():
        for s, x in enumerate(xs):
            _fake_span_run(tmp_path / "ok", v, s, x if math.isfinite(x) else 2.0)
    rep = _span_report(tmp_path / "ok")
    (k,) = rep["lookahead1_target"]
    (t,) = rep["lookahead_trend"]
    assert k["judged"] and k["pass"] and t["judged"] and t["declines_with_lookahead"]
    md = quality_report.markdown(rep)
    assert "-> PASS" in md and "(declines)" in md and "finite seeds" not in md and "diverged" not in md


def test_nonfinite_steps_are_noted_under_the_table(tmp_path):
    """Runs that skipped non-finite steps but ended finite are counted, and listed under the table;
    records without the key (older runs) count as 0."""
    _fake_span_run(tmp_path, "conventional", 0, 2.0, nonfinite_steps=3)
    _fake_span_run(tmp_path, "conventional", 1, 2.1)  # no key
    _fake_span_run(tmp_path, "conventional", 2, NAN, nonfinite_steps=11)  # diverged: not in the note
    _fake_span_run(tmp_path, "pregated-L1", 0, 2.0, nonfinite_steps=1)
    _fake_span_run(tmp_path, "pregated-L1", 1, 2.0, nonfinite_steps=0)
    rep = _span_report(tmp_path, ["conventional", "pregated-L1"])
    c = {x["variant"]: x for x in rep["results"]}
    assert c["conventional"]["nonfinite_steps"] == [3, 0, 11] and c["conventional"]["headline"]["values"] == [2.0, 2.1]
    assert c["pregated-L1"]["nonfinite_steps"] == [1, 0] and c["pregated-L1"]["n_finite"] == 2
    md = quality_report.markdown(rep)
    table, rest = md.split("\n\n", 1)
    assert "skipped" not in table
    note = next(line for line in rest.splitlines() if "non-finite" in line)
    assert "m/span/conventional/seed0 (3), m/span/pregated-L1/seed0 (1)." in note
    assert "seed2" not in note and "seed1" not in note
    # no skipped step anywhere: no note
    _fake_span_run(tmp_path / "none", "conventional", 0, 2.0, nonfinite_steps=0)
    assert "non-finite" not in quality_report.markdown(_span_report(tmp_path / "none", ["conventional"]))


def test_plot_skips_non_finite_values(tmp_path):
    """The medium study's shape: 2 of 3 span seeds of every variant NaN, plus a fully diverged row and a
    NaN agreement; the plot is drawn (it used to fail: "Axis limits cannot be NaN or Inf")."""
    for v in quality_report.VARIANTS:
        for s in range(3):
            _fake_span_run(tmp_path, v, s, 2.3 + 0.01 * s if s == 2 and v != "pregated-L3" else NAN)
    rep = _span_report(tmp_path)
    rep["results"][1]["agreement_after_finetune_mean"] = NAN
    rep["results"][2]["headline"]["std"] = float("inf")
    quality_report.plot(rep, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").stat().st_size > 0
    # every row diverged: still a picture
    for v in quality_report.VARIANTS:
        for s in range(3):
            _fake_span_run(tmp_path / "all", v, s, NAN)
    quality_report.plot(_span_report(tmp_path / "all"), tmp_path / "all.png")
    assert (tmp_path / "all.png").stat().st_size > 0
