"""W&B resume: `train.resume=true` after a kill continues the same W&B run (its id is kept in the
checkpoint's training state)."""

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

import train.config

ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "train.max_steps=4",
    "train.batch_size=4",
    "train.max_input_len=48",
    "train.max_target_len=24",
    "eval.at_start=false",
    "eval.test=false",
    "eval.generate_examples=0",
    "eval.max_examples=4",
    "train.eval_every=0",
    "train.progress=false",
    "train.threads=1",
    "logger=wandb",
]


class _FakeRun:
    def __init__(self, run_id, sink):
        self.id, self.sink = run_id, sink

    def log(self, metrics, step=None):
        self.sink.logged.append((self.id, step, dict(metrics)))

    def log_artifact(self, art):
        pass

    def finish(self):
        self.sink.finished.append(self.id)


def _fake_wandb():
    """A stand-in for the wandb package that records init() calls; a run without an id gets a new one."""
    w = types.ModuleType("wandb")
    w.inits, w.logged, w.finished = [], [], []

    def init(**kw):
        w.inits.append(kw)
        return _FakeRun(kw.get("id") or f"fake{len(w.inits)}", w)

    class Artifact:
        def __init__(self, *a, **k):
            pass

        def add_dir(self, *a):
            pass

        def add_file(self, *a):
            pass

    w.init = init
    w.Table = lambda columns, data: ("table", columns, data)
    w.Image = lambda path: ("image", path)
    w.Artifact = Artifact
    return w


def _cfg(overrides):
    train.config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_resume_continues_the_same_wandb_run(tmp_path, monkeypatch):
    from train.loop import run

    fake = _fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(_cfg(FAST + ["train.stop_after_steps=2"]), tmp_path)
    assert len(fake.inits) == 1 and "id" not in fake.inits[0]  # a fresh run: W&B picks the id
    state = torch.load(tmp_path / "checkpoint" / "training_state.pt", weights_only=False)
    assert state["step"] == 2 and state["wandb_run_id"] == "fake1"

    res = run(_cfg(FAST + ["train.resume=true"]), tmp_path)
    assert res["step"] == 4 and not res["stopped"]
    assert len(fake.inits) == 2
    assert fake.inits[1]["id"] == "fake1" and fake.inits[1]["resume"] == "allow"
    after = [(rid, step) for rid, step, _ in fake.logged[-3:]]
    assert all(rid == "fake1" for rid, _ in after) and all(s is None or s > 2 for _, s in after), after
    # the final checkpoint still names the run, for a later resume
    state = torch.load(tmp_path / "checkpoint" / "training_state.pt", weights_only=False)
    assert state["wandb_run_id"] == "fake1"

    # a new run (no resume) in another directory starts a new W&B run
    run(_cfg(FAST + ["train.max_steps=1"]), tmp_path / "other")
    assert "id" not in fake.inits[2]


def test_tracker_reuses_the_run_id_with_real_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from train.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    conf = SimpleNamespace(kind="wandb", project="pregated-moe-test", entity=None, mode="offline", tags=[])
    t = Tracker(conf, {"seed": 0}, "train", tmp_path, name="first")
    first = t.run_id
    t.log({"train/loss": 1.0}, step=1)
    t.finish()
    t = Tracker(conf, {"seed": 0}, "train", tmp_path, name="resumed", run_id=first)
    assert first and t.run_id == first
    t.log({"train/loss": 0.5}, step=2)
    t.finish()
    fresh = Tracker(conf, {"seed": 0}, "train", tmp_path, name="fresh")
    assert fresh.run_id != first
    fresh.finish()
