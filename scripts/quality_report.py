"""Issue #7: does pre-gating keep model quality? Runs the study through `python -m train` and reports it.

For each model (small, medium), task (span, docsum), variant (conventional; pre-gated with lookahead
1, 2, 3) and seed (0, 1, 2) it fine-tunes the model's pretrained conventional checkpoint with
conf/experiment/quality_finetune.yaml (the same steps, data and hyper-parameters for every variant;
only `pregate.enabled` / `model.lookahead` differ), each run in its own directory
<root>/finetune/<model>/<task>/<variant>/seed<s>, then aggregates the runs' metrics.json files into
bench/results/quality.json, a plot (quality.png) and a markdown table (quality.md, also printed).

    # the whole study on the GPU(s), pretraining first (conf/experiment/pretrain_<model>.yaml):
    python scripts/quality_report.py --pretrain --jobs 8
    # with pretrained checkpoints from elsewhere:
    python scripts/quality_report.py --pretrained small=DIR medium=DIR
    python scripts/quality_report.py --dry-run            # print the commands, run nothing
    python scripts/quality_report.py --aggregate-only     # just (re)build the report from the run dirs

Resumable: a run whose metrics.json says it finished is skipped; an unfinished one is continued
(`train.resume=true`). `--time-budget S` stops launching runs after S seconds and sends SIGTERM to
the ones still going at S + --grace (train saves a resumable checkpoint and exits), so a session with
a per-command limit calls this repeatedly and the last call writes the report.
A run that runs out of GPU memory beside the others (too many --jobs for the GPU) goes back in the
queue, up to twice, and fewer runs start at a time from then on.

Headline metrics (the test split, the final checkpoint of each run):
  span   - test loss (span-corruption cross-entropy per target byte token on held-out modules; lower
           is better). Token accuracy is reported beside it. Span has no decoded metric: the targets
           are the masked words themselves, so loss is the direct measure of how well they are
           predicted.
  docsum - test ROUGE-L F (greedy decoding of every test docstring summary; higher is better),
           ROUGE-1 (the paper's Xsum figure) and loss beside it.
Mean and standard deviation (ddof=1; 0 for a single seed) over seeds. A run whose test headline
metric or loss (or validation loss) is not finite diverged: it is left out of every mean and std of
its row, which says how many seeds diverged (`n_runs`, `n_finite`, `diverged_seeds`), and a verdict
(the lookahead-1 target, the lookahead trend) over a row with a diverged seed is not judged (`judged`
false and the reason) rather than passed or failed. Runs that skipped optimizer steps for a non-finite
loss or gradient norm (`nonfinite_steps`) but ended finite are listed under the table. `rel_diff_pct` is
100 (variant - conventional) / |conventional| of the means; `quality_change_pct` is the same with
the sign turned so that positive means better. The lookahead-1 target: quality_change_pct >= -1
(at most 1% relative worse) or |difference| <= the seed spread sqrt(std_conv^2 + std_variant^2).
Pre-gate agreement (percent of tokens on which a pre-gate picks the expert that the router it
replaced picks on the block's actual input), per MoE block, on the validation split: at conversion
(the step-0 evaluation, before any update) and after fine-tuning (the final evaluation).
Expert-load balance per MoE block (final validation evaluation): max/mean of the per-expert token
counts (1 is perfect balance, E is collapse onto one expert) and the entropy of the load
distribution normalised by log E (1 is perfect balance).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
MODELS = ["small", "medium"]
TASKS = ["span", "docsum"]
VARIANTS = ["conventional", "pregated-L1", "pregated-L2", "pregated-L3"]
SEEDS = [0, 1, 2]
FINETUNE_EXPERIMENT = "quality_finetune"
# task -> (headline metric, higher is better, other metrics reported)
HEADLINE = {
    "span": ("loss", False, ["token_accuracy"]),
    "docsum": ("rougeL", True, ["rouge1", "rouge2", "loss", "token_accuracy"]),
}
# The fine-tuned model kept (weights) by default: the candidate default model of `python -m infer`.
KEEP = ("small", "docsum", "pregated-L1", 0)


# -- commands ---------------------------------------------------------------------------------
def variant_overrides(variant: str) -> list[str]:
    if variant == "conventional":
        return ["pregate.enabled=false"]
    m = re.fullmatch(r"pregated-L(\d+)", variant)
    if not m:
        raise SystemExit(f"unknown variant {variant!r}; expected conventional or pregated-L<k>")
    return ["pregate.enabled=true", f"model.lookahead={int(m[1])}"]


def pretrain_experiment(model: str) -> list[str]:
    """conf/experiment/pretrain_<model>.yaml; a model without one gets the small recipe with model=<model>."""
    if (CONF / "experiment" / f"pretrain_{model}.yaml").exists():
        return [f"experiment=pretrain_{model}"]
    return ["experiment=pretrain_small", f"model={model}"]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            if prefix == "" and k == "defaults":
                continue
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _fmt(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


_LOST: dict[str, list[str]] = {}


def lost_experiment_keys(experiment_overrides: list[str]) -> list[str]:
    """Overrides restating the experiment's own values that composition did not keep.

    conf/train.yaml lists `_self_` after `experiment` in its defaults, so its own train.*/eval.* values
    are merged over an experiment's: `experiment=X` alone would run with train.yaml's max_steps,
    batch_size, ... . Until that is reordered, restating the lost keys on the command line (which
    always wins) makes the recipe take effect; when composition keeps them, this returns []."""
    key = " ".join(experiment_overrides)
    if key in _LOST:
        return _LOST[key]
    import yaml
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT))
    import train.config

    train.config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=experiment_overrides)
    name = next(o.split("=", 1)[1] for o in experiment_overrides if o.startswith("experiment="))
    want = _leaves(yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text()) or {})
    lost = []
    for k, v in want.items():
        got = OmegaConf.select(cfg, k)
        if got != v and not (isinstance(v, float) and isinstance(got, float) and math.isclose(v, got)):
            lost.append(f"{k}={_fmt(v)}")
    _LOST[key] = lost
    return lost


def train_command(experiment: list[str], overrides: list[str], run_dir: Path) -> list[str]:
    """`python -m train` with the experiment, its restated lost keys, the overrides and the run dir;
    a key given twice keeps its last value (Hydra refuses duplicates)."""
    tail = [*overrides, "train.resume=true", "train.progress=false", f"hydra.run.dir={run_dir}"]
    mine = {_key(o) for o in tail}
    restated = [o for o in lost_experiment_keys(experiment) if _key(o) not in mine]
    out: dict[str, str] = {}
    for o in [*restated, *tail]:
        out.pop(_key(o), None)
        out[_key(o)] = o
    return [sys.executable, "-m", "train", *experiment, *out.values()]


# -- runs -------------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's metrics.json if the run finished (not stopped early), else None."""
    p = run_dir / "metrics.json"
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    return None if m.get("stopped") else m


@dataclass
class Job:
    name: str
    run_dir: Path
    experiment: list[str]
    overrides: list[str]
    after: Path | None = None  # a run dir that must have finished first
    model: str = ""
    task: str = ""
    variant: str = ""
    seed: int = -1
    cmd: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    started: float = 0.0
    status: str = "pending"  # pending | done | failed | skipped | running | stopped
    oom_retries: int = 0  # times it was put back after running out of GPU memory
    init_run: Path | None = None  # a pretraining run dir: init.checkpoint is resolved at launch
    nproc: int = 1  # > 1: data-parallel under torchrun (DDP), one process per GPU

    def build(self) -> None:
        if self.init_run is not None:  # its best weights exist only once the pretraining has run
            init = f"init.checkpoint={pretrained_checkpoint(self.init_run).resolve()}"
            self.overrides = [init if o.startswith("init.checkpoint=") else o for o in self.overrides]
        self.cmd = train_command(self.experiment, self.overrides, self.run_dir)
        if self.nproc > 1:  # python -m torch.distributed.run --nproc_per_node=N -m train ...
            i = self.cmd.index("-m")
            self.cmd = [*self.cmd[:i], "-m", "torch.distributed.run", f"--nproc_per_node={self.nproc}",
                        "--standalone", *self.cmd[i:]]


def pretrained_checkpoint(pre_dir: Path) -> Path:
    """What fine-tunes start from: the pretraining's lowest-validation-loss weights where it kept them
    (train.keep_best: <run>/best, named in its metrics.json), else its final checkpoint."""
    m = read_metrics(pre_dir) or {}
    if m.get("best") and (pre_dir / "best" / "config.json").exists():
        return pre_dir / "best"
    return pre_dir / "checkpoint"


def plan(a: argparse.Namespace) -> tuple[list[Job], dict[str, Path]]:
    root = Path(a.root)
    jobs: list[Job] = []
    ckpts: dict[str, Path] = {}
    given = dict(s.split("=", 1) for s in a.pretrained)
    for m in a.models:
        if m in given:
            ckpts[m] = Path(given[m])
            pre_dir = None
        else:
            pre_dir = root / "pretrain" / m
            ckpts[m] = pretrained_checkpoint(pre_dir)
            if a.pretrain:
                ov = list(a.pretrain_override)
                if a.pretrain_steps:
                    ov.append(f"train.max_steps={a.pretrain_steps}")
                jobs.append(
                    Job(f"pretrain {m}", pre_dir, pretrain_experiment(m), ov, model=m, nproc=a.pretrain_nproc)
                )
            elif not (ckpts[m] / "config.json").exists() and not a.dry_run and not a.aggregate_only:
                raise SystemExit(
                    f"no pretrained `{m}` checkpoint at {ckpts[m]}: pass --pretrain (runs "
                    f"{' '.join(pretrain_experiment(m))}) or --pretrained {m}=DIR"
                )
        for t in [] if a.pretrain_only else a.tasks:
            for v in a.variants:
                for s in a.seeds:
                    ov = [
                        f"init.checkpoint={ckpts[m].resolve()}",
                        f"data={t}",
                        f"seed={s}",
                        *variant_overrides(v),
                    ]
                    if a.steps:
                        ov.append(f"train.max_steps={a.steps}")
                    ov += a.override
                    jobs.append(
                        Job(
                            f"{m}/{t}/{v}/seed{s}",
                            root / "finetune" / m / t / v / f"seed{s}",
                            [f"experiment={FINETUNE_EXPERIMENT}"],
                            ov,
                            after=pre_dir if a.pretrain and pre_dir is not None else None,
                            init_run=pre_dir,
                            model=m,
                            task=t,
                            variant=v,
                            seed=s,
                        )
                    )
    return jobs, ckpts


def gpu_ids(spec: str) -> list[str]:
    if spec == "auto":
        try:
            import torch

            n = torch.cuda.device_count()
        except Exception:  # pragma: no cover
            n = 0
        return [str(i) for i in range(n)]
    return [g for g in spec.split(",") if g != ""]


def tidy(job: Job, keep_all: bool) -> None:
    """Drop what a finished fine-tune does not need (the optimizer state; the weights but for KEEP)."""
    ck = job.run_dir / "checkpoint"
    (ck / "training_state.pt").unlink(missing_ok=True)
    if job.task and not keep_all and (job.model, job.task, job.variant, job.seed) != KEEP:
        for p in ck.glob("*.safetensors*"):
            p.unlink()


def start_mps(root: Path) -> dict[str, str] | None:
    """Start an MPS control daemon (the runs inherit its pipe directory through the environment);
    None, with the reason printed, where that is not possible."""
    import shutil

    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        print("[quality] --mps: nvidia-cuda-mps-control not found; the runs time-slice the GPU", flush=True)
        return None
    env = {
        "CUDA_MPS_PIPE_DIRECTORY": str(root / "mps" / "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(root / "mps" / "log"),
    }
    for d in env.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    r = subprocess.run([exe, "-d"], env={**os.environ, **env}, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"[quality] --mps: the daemon did not start ({r.stderr.strip() or r.returncode}); "
              "the runs time-slice the GPU", flush=True)
        return None
    os.environ.update(env)
    print(f"[quality] MPS daemon started (pipes in {env['CUDA_MPS_PIPE_DIRECTORY']})", flush=True)
    return {"exe": exe, **env}


def stop_mps(mps: dict[str, str]) -> None:
    env = {**os.environ, **{k: v for k, v in mps.items() if k != "exe"}}
    subprocess.run([mps["exe"]], input="quit\n", text=True, env=env, capture_output=True)
    for k in mps:
        if k != "exe":
            os.environ.pop(k, None)


OOM_RETRIES = 2  # a run that ran out of GPU memory is put back this often (resumes from its checkpoint)
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError")


def ran_out_of_memory(run_dir: Path) -> bool:
    """Whether the end of the run's train.log reports a CUDA out-of-memory error."""
    try:
        with open(run_dir / "train.log", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 20000))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return False
    return any(m in tail for m in OOM_MARKERS)


def execute(jobs: list[Job], a: argparse.Namespace) -> None:
    gpus = gpu_ids(a.gpus)
    ncpu = os.cpu_count() or 1
    threads = a.threads or max(1, ncpu // max(1, a.jobs))
    t0 = time.monotonic()
    slots: list[Job | None] = [None] * a.jobs
    # runs at a time: --jobs, lowered when a run runs out of GPU memory beside the others
    limit = a.jobs
    pending = [j for j in jobs if j.status == "pending"]
    needed = {j.after for j in jobs if j.after is not None}
    term_sent = False
    print(
        f"[quality] {len(pending)} runs to do, {a.jobs} at a time, GPUs {gpus or 'none'}, "
        f"{threads} CPU threads each",
        flush=True,
    )
    while pending or any(slots):
        now = time.monotonic() - t0
        over = a.time_budget and now > a.time_budget
        if a.time_budget and now > a.time_budget + a.grace and not term_sent:
            for j in slots:
                if j is not None and j.proc is not None:
                    print(
                        f"[quality] time budget: SIGTERM {j.name} (it saves a resumable checkpoint)",
                        flush=True,
                    )
                    j.proc.send_signal(signal.SIGTERM)
            term_sent = True
        for i, j in enumerate(slots):
            if j is None or j.proc is None or j.proc.poll() is None:
                continue
            rc = j.proc.returncode
            m = read_metrics(j.run_dir)
            # a run this loop sent SIGTERM to and that died of it (before its handler was in place) is
            # stopped, not failed: it resumes from its last checkpoint (or from scratch) next call
            # (torchrun exits non-zero after passing the SIGTERM on, once its ranks have saved and exited)
            stopped = rc == 0 or (term_sent and (rc == -signal.SIGTERM or j.nproc > 1))
            j.status = "done" if rc == 0 and m is not None else ("stopped" if stopped else "failed")
            if j.status == "failed" and not term_sent and j.oom_retries < OOM_RETRIES and ran_out_of_memory(j.run_dir):
                # too many runs for the GPU's memory: fewer at a time, and this one again (train.resume)
                others = sum(1 for o in slots if o is not None and o is not j)
                limit = max(1, min(limit, others))
                j.oom_retries += 1
                j.status, j.proc = "pending", None
                pending.append(j)
                print(
                    f"[quality] out of GPU memory: {j.name} goes back in the queue (retry {j.oom_retries} of "
                    f"{OOM_RETRIES}); at most {limit} runs at a time from now (--jobs {a.jobs} was too many)",
                    flush=True,
                )
                slots[i] = None
                continue
            if j.status == "done":
                tidy(j, a.keep_checkpoints)
            print(
                f"[quality] {j.status}: {j.name} ({time.monotonic() - j.started:.0f} s)"
                + (f" rc={rc}, see {j.run_dir / 'train.log'}" if j.status == "failed" else ""),
                flush=True,
            )
            slots[i] = None
        for i in range(a.jobs):
            if slots[i] is not None or over or sum(o is not None for o in slots) >= limit:
                continue
            ready = None
            # Jobs that others wait on (pretraining) first: they are the critical path. Otherwise a
            # model's fine-tunes can fill every slot while the other model's pretraining waits.
            for j in sorted(pending, key=lambda j: j.run_dir not in needed):
                dep = next((d for d in jobs if d.run_dir == j.after), None)
                if j.after is None or (
                    read_metrics(j.after) is not None and (dep is None or dep.status != "running")
                ):
                    ready = j
                    break
                if dep is not None and dep.status in ("failed", "stopped"):
                    j.status = "skipped"
            pending = [j for j in pending if j.status == "pending"]
            if ready is None:
                break
            pending.remove(ready)
            ready.build()
            ready.run_dir.mkdir(parents=True, exist_ok=True)
            env = {
                **os.environ,
                "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "OMP_NUM_THREADS": str(threads),
            }
            env.setdefault("WANDB_MODE", "disabled")
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = (
                    ",".join(gpus[: ready.nproc]) if ready.nproc > 1 else gpus[i % len(gpus)]
                )
            if ready.nproc > 1:
                # the ranks run outside the MPS daemon: NCCL under MPS is not a setup measured here
                for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
                    env.pop(k, None)
            cmd = (
                [*ready.cmd, f"train.threads={threads}"]
                if not any(o.startswith("train.threads=") for o in ready.cmd)
                else ready.cmd
            )
            log = open(ready.run_dir / "train.log", "a")  # noqa: SIM115 - closed with the process
            ready.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            ready.started = time.monotonic()
            ready.status = "running"
            slots[i] = ready
            print(
                f"[quality] start: {ready.name}" + (f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""),
                flush=True,
            )
        if over and not any(slots):
            left = [j for j in pending if j.status == "pending"]
            if left:
                print(f"[quality] time budget spent: {len(left)} runs left for the next call", flush=True)
            break
        if not any(slots) and pending:
            # nothing can start: every pending run waits on a dependency that is not running
            for j in pending:
                j.status = "skipped"
            break
        time.sleep(0.2)


# -- aggregation --------------------------------------------------------------------------------
def stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "values": values}


def _isfinite(x: Any) -> bool:
    """A finite number (None, a string, NaN or inf is not)."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def diverged(run: dict[str, Any], head: str) -> bool:
    """The run's test headline metric or loss, or its validation loss, is not finite (null included)."""
    test, val = run["test"], run.get("validation") or {}
    return not all(_isfinite(x) for x in (test[head], test.get("loss", 0.0), val.get("loss", 0.0)))


def _diverged_note(c: dict[str, Any]) -> str:
    """e.g. `pregated-L1: 2 of 3 seeds diverged (seeds 0, 1)`."""
    ds = c["diverged_seeds"]
    return (
        f"{c['variant']}: {len(ds)} of {c['n_runs']} seeds diverged "
        f"(seed{'s' if len(ds) > 1 else ''} {', '.join(map(str, ds))})"
    )


def _blocks(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _per_block(runs: list[dict[str, Any]], pick) -> dict[str, dict[str, Any]]:
    vals: dict[str, list[float]] = {}
    for r in runs:
        for b, v in pick(r).items():
            vals.setdefault(b, []).append(v)
    return {b: stats(v) for b, v in sorted(vals.items())}


def _step0(m: dict[str, Any]) -> dict[str, Any]:
    return next(
        (h for h in m.get("history", []) if h.get("split") == "validation" and h.get("step") == 0), {}
    )


def num_experts(run_dir: Path, fallback: Path | None) -> int | None:
    for d in (run_dir / "checkpoint", fallback):
        if d is not None and (d / "config.json").exists():
            return int(json.loads((d / "config.json").read_text())["num_experts"])
    return None


def param_count(ckpt: Path) -> int | None:
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:  # weights dropped (a kept record of the runs): count the model config.json describes
        if not (ckpt / "config.json").exists():
            return None
        sys.path.insert(0, str(ROOT))
        from models.checkpoint import load_config, meta_model

        return sum(p.numel() for p in meta_model(load_config(ckpt)).parameters())
    from safetensors import safe_open

    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                n += math.prod(h.get_slice(k).get_shape())
    return n


def pretrain_summary(run_dir: Path) -> dict[str, Any] | None:
    m = read_metrics(run_dir)
    if m is None:
        return None
    curve = [(h["step"], h["loss"]) for h in m.get("history", []) if h.get("split") == "validation"]
    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "steps": m.get("step"),
        "early_stopped": bool(m.get("early_stopped")),
        "train_tokens": m.get("train_tokens"),
        "train_seconds": m.get("train_seconds"),
        "train_tokens_per_s": m.get("train_tokens_per_s"),
        "validation_curve": curve,
        "test": {k: v for k, v in (m.get("test") or {}).items() if "/" not in k},
    }
    cfg_file = run_dir / ".hydra" / "config.yaml"
    if cfg_file.exists():
        import yaml

        c = yaml.safe_load(cfg_file.read_text())
        out["recipe"] = {
            "model": c["model"]["name"],
            "batch_size": c["train"]["batch_size"],
            "max_steps": c["train"]["max_steps"],
            "lr": c["optim"]["lr"],
            "dropout_rate": c["model"]["dropout_rate"],
            "data": c["data"]["name"],
        }
    out["parameters"] = param_count(run_dir / "checkpoint")
    if curve:
        losses = [v for _, v in curve]
        last = curve[-1][0]
        tail = [v for s, v in curve if s >= 0.8 * last]
        out["validation_loss_min"] = min(losses)
        out["validation_loss_min_step"] = min(curve, key=lambda sv: sv[1])[0]
        out["validation_loss_end"] = losses[-1]
        # flattened: the last 20% of the run moved the validation loss by < 2% of its value
        out["flattened"] = bool(tail) and (max(tail) - min(tail)) <= 0.02 * min(tail)
        # stopped improving: no new minimum in the last 20% of the run (it ran past its best point)
        out["stopped_improving"] = out["validation_loss_min_step"] < 0.8 * last
        out["rising_at_end"] = losses[-1] > 1.02 * min(losses)
        # long enough (issue #7): flat at the end, or past the point where validation loss stopped falling
        out["long_enough"] = out["flattened"] or out["stopped_improving"]
    best = m.get("best")
    start = pretrained_checkpoint(run_dir)
    out["finetunes_start_from"] = (
        {"checkpoint": "best", "step": best["step"], "validation_loss": best["validation_loss"]}
        if start.name == "best" and best
        else {"checkpoint": "final", "step": m.get("step"), "validation_loss": m.get("validation_loss_end")}
    )
    if cfg_file.exists():
        out["recipe"]["remask_each_epoch"] = bool(c["data"].get("remask_each_epoch", False))
        out["recipe"]["keep_best"] = bool(c["train"].get("keep_best", False))
        out["recipe"]["early_stop_evals"] = int(c["train"].get("early_stop_evals", 0))
    return out


def aggregate(jobs: list[Job], ckpts: dict[str, Path], a: argparse.Namespace) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    for m in a.models:
        for t in a.tasks:
            head, higher, others = HEADLINE[t]
            for v in a.variants:
                runs, seeds, missing = [], [], []
                for s in a.seeds:
                    d = Path(a.root) / "finetune" / m / t / v / f"seed{s}"
                    r = read_metrics(d)
                    if r is None:
                        missing.append(s)
                        continue
                    r["_dir"] = d
                    r["_seed"] = s
                    runs.append(r)
                    seeds.append(s)
                if not runs:
                    continue
                E = num_experts(runs[0]["_dir"], ckpts.get(m))
                all_runs = runs
                # a diverged run counts as run, but none of its numbers enters the row's statistics
                runs = [r for r in all_runs if not diverged(r, head)]
                cell: dict[str, Any] = {
                    "model": m,
                    "task": t,
                    "variant": v,
                    "seeds": seeds,
                    "missing_seeds": missing,
                    "run_dirs": [str(r["_dir"]) for r in all_runs],
                    "n_runs": len(all_runs),
                    "n_finite": len(runs),
                    "diverged_seeds": [r["_seed"] for r in all_runs if diverged(r, head)],
                    # optimizer steps skipped for a non-finite loss or gradient norm, per seed (older
                    # records lack the key: 0)
                    "nonfinite_steps": [int(r.get("nonfinite_steps") or 0) for r in all_runs],
                    "headline": {
                        "metric": f"test/{head}",
                        "higher_is_better": higher,
                        **stats([float(r["test"][head]) for r in runs]),
                    },
                    "metrics": {
                        f"{split}/{k}": stats([float(r[split][k]) for r in runs])
                        for split in ("test", "validation")
                        for k in [head, *others]
                        if runs and all(k in r.get(split, {}) for r in runs)
                    },
                    "steps": sorted({r["step"] for r in all_runs}),
                    "train_seconds": stats([float(r["train_seconds"]) for r in runs]),
                    "num_experts": E,
                }
                if v != "conventional":
                    cell["agreement_at_conversion"] = _per_block(
                        runs, lambda r: _blocks(_step0(r), "agreement/")
                    )
                    cell["agreement_after_finetune"] = _per_block(
                        runs, lambda r: _blocks(r["validation"], "agreement/")
                    )
                    for when in ("at_conversion", "after_finetune"):
                        blocks = cell[f"agreement_{when}"]
                        cell[f"agreement_{when}_mean"] = (
                            sum(b["mean"] for b in blocks.values()) / len(blocks) if blocks else None
                        )
                if E:
                    cell["load_max_over_mean"] = _per_block(
                        runs,
                        lambda r, e=E: {b: x * e for b, x in _blocks(r["validation"], "load_max/").items()},
                    )
                    cell["load_entropy"] = _per_block(
                        runs, lambda r: _blocks(r["validation"], "load_entropy/")
                    )
                    lm = cell["load_max_over_mean"]
                    cell["load_max_over_mean_worst_block"] = (
                        max(b["mean"] for b in lm.values()) if lm else None
                    )
                cells[(m, t, v)] = cell
                results.append(cell)
    # relative differences and the targets
    checks = []
    for (m, t, v), c in cells.items():
        conv = cells.get((m, t, "conventional"))
        if conv is None:
            continue
        hc, hv = conv["headline"], c["headline"]
        # `complete`: no seed of either row diverged (a Δ over the finite seeds is shown, never judged)
        complete = not (conv["diverged_seeds"] or c["diverged_seeds"])
        c["vs_conventional"] = None
        if hc["n"] and hv["n"]:  # over the finite seeds
            diff = hv["mean"] - hc["mean"]
            rel = 100.0 * diff / abs(hc["mean"]) if hc["mean"] else float("nan")
            spread = math.sqrt(hc["std"] ** 2 + hv["std"] ** 2)
            c["vs_conventional"] = {
                "diff": diff,
                "rel_diff_pct": rel,
                "quality_change_pct": rel if hv["higher_is_better"] else -rel,
                "seed_spread": spread,
                "complete": complete,
            }
        if v != "pregated-L1":
            continue
        if not complete:
            # a mean over the seeds that happened not to diverge is no basis for a verdict
            check = {
                "model": m,
                "task": t,
                "judged": False,
                "why": "; ".join(_diverged_note(x) for x in (conv, c) if x["diverged_seeds"]),
                "pass": None,
                "n_seeds": [conv["n_runs"], c["n_runs"]],
                "n_finite": [hc["n"], hv["n"]],
            }
            if c["vs_conventional"]:
                check["quality_change_pct_finite_seeds"] = c["vs_conventional"]["quality_change_pct"]
            checks.append(check)
            continue
        q = c["vs_conventional"]["quality_change_pct"]
        ok_rel, ok_spread = q >= -1.0, abs(diff) <= spread
        checks.append(
            {
                "model": m,
                "task": t,
                "judged": True,
                "quality_change_pct": q,
                "within_1pct": abs(rel) <= 1.0,
                "at_most_1pct_worse": ok_rel,
                "within_seed_spread": ok_spread,
                "pass": ok_rel or ok_spread,
                "n_seeds": [hc["n"], hv["n"]],
            }
        )
    trends = []
    for m in a.models:
        for t in a.tasks:
            rows = {v: cells[(m, t, v)] for v in a.variants if (m, t, v) in cells and v.startswith("pregated-L")}
            if len(rows) < 2:
                continue
            order = sorted(rows, key=lambda v: int(v.rsplit("L", 1)[1]))
            bad = [rows[v] for v in order if rows[v]["diverged_seeds"]]
            means = [rows[v]["headline"]["mean"] if rows[v]["headline"]["n"] else None for v in order]
            trend: dict[str, Any] = {
                "model": m,
                "task": t,
                "lookaheads": order,
                "headline_means": means,
                "judged": not bad,
            }
            if bad:
                trend["why"] = "; ".join(_diverged_note(x) for x in bad)
                trend["declines_with_lookahead"] = None
            else:
                higher = HEADLINE[t][1]
                q = [x if higher else -x for x in means]  # quality: higher is better
                trend["declines_with_lookahead"] = all(x >= y for x, y in zip(q, q[1:]))
            trends.append(trend)
    pretrain = {m: pretrain_summary(Path(a.root) / "pretrain" / m) for m in a.models}
    return {
        "issue": 7,
        "what": "pre-gated vs conventional fine-tuning of Switch models pretrained here from scratch on "
        "the embedded stdlib text; see scripts/quality_report.py's docstring for the metrics",
        "recipes": {
            "pretrain": {m: pretrain_experiment(m) for m in a.models},
            "finetune": f"conf/experiment/{FINETUNE_EXPERIMENT}.yaml",
            "extra_overrides": a.override,
            "steps_override": a.steps,
        },
        "models": a.models,
        "tasks": a.tasks,
        "variants": a.variants,
        "seeds": a.seeds,
        "headline_metrics": {
            t: {"metric": f"test/{h[0]}", "higher_is_better": h[1]} for t, h in HEADLINE.items()
        },
        "pretrain": pretrain,
        "results": results,
        "lookahead1_target": checks,
        "lookahead_trend": trends,
        "runs": {
            "planned": len([j for j in jobs if j.model and j.task]),
            "finished": sum(len(c["seeds"]) for c in results),
            "diverged": [
                f"{c['model']}/{c['task']}/{c['variant']}/seed{s}" for c in results for s in c["diverged_seeds"]
            ],
            "failed": [j.name for j in jobs if j.status == "failed"],
        },
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _finite(x: Any) -> Any:
    """NaN/inf -> None, so that the report is strict JSON (e.g. a relative difference to a 0 mean)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # pragma: no cover
        pass
    for mod in ("hydra", "omegaconf", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except Exception:  # pragma: no cover
        pass
    return info


# -- presentation ---------------------------------------------------------------------------------
def _ms(s: dict[str, Any] | None, nd: int = 3) -> str:
    if not s:
        return "-"
    return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}" + (f" (n={s['n']})" if s["n"] != 3 else "")


def _headline_cell(c: dict[str, Any]) -> str:
    """`loss 1.533 ± 0.006`; with diverged seeds `loss 2.352 (1 of 3 seeds; 2 diverged)`, or
    `loss diverged (3 of 3 seeds)` when none is finite."""
    h = c["headline"]
    name = h["metric"].split("/", 1)[1]
    nd = len(c.get("diverged_seeds") or [])
    if not nd:
        return f"{name} {_ms(h)}"
    if not h["n"]:
        return f"{name} diverged ({nd} of {c['n_runs']} seeds)"
    num = f"{h['mean']:.3f}" if h["n"] == 1 else f"{h['mean']:.3f} ± {h['std']:.3f}"
    return f"{name} {num} ({h['n']} of {c['n_runs']} seeds; {nd} diverged)"


def markdown(rep: dict[str, Any]) -> str:
    lines = [
        "| model | task | variant | headline (test) | Δ vs conventional | token acc. (test) | "
        "pre-gate agreement %: conversion → fine-tuned | load max/mean (worst block) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    skipped = []
    for c in rep["results"]:
        vs = c.get("vs_conventional")
        delta = "-" if c["variant"] == "conventional" or not vs else f"{vs['rel_diff_pct']:+.2f}%"
        if delta != "-" and not vs.get("complete", True):
            delta += " (finite seeds)"
        for s, k in zip(c["seeds"], c.get("nonfinite_steps") or []):
            if k and s not in c["diverged_seeds"]:
                skipped.append(f"{c['model']}/{c['task']}/{c['variant']}/seed{s} ({k})")
        ag = "-"
        if c.get("agreement_at_conversion_mean") is not None:
            ag = f"{c['agreement_at_conversion_mean']:.1f} → {c['agreement_after_finetune_mean']:.1f}"
        lb = c.get("load_max_over_mean_worst_block")
        load = "-" if lb is None else f"{lb:.2f} (E={c['num_experts']})"
        lines.append(
            f"| {c['model']} | {c['task']} | {c['variant']} | {_headline_cell(c)} | {delta} | "
            f"{_ms(c['metrics'].get('test/token_accuracy'), 2)} | {ag} | "
            f"{load} |"
        )
    out = ["\n".join(lines), ""]
    if skipped:
        out += [
            "Optimizer steps skipped for a non-finite loss or gradient norm, in runs whose results are finite "
            "(and counted): " + ", ".join(skipped) + ".",
            "",
        ]
    for k in rep["lookahead1_target"]:
        if not k.get("judged", True):
            out.append(f"- {k['model']}/{k['task']}: pre-gated L=1 vs conventional not judged: {k['why']}")
            continue
        out.append(
            f"- {k['model']}/{k['task']}: pre-gated L=1 quality change {k['quality_change_pct']:+.2f}% "
            f"({'within' if k['within_seed_spread'] else 'outside'} the seed spread) -> "
            f"{'PASS' if k['pass'] else 'FAIL'}"
        )
    for t in rep["lookahead_trend"]:
        if not t.get("judged", True):
            out.append(
                f"- {t['model']}/{t['task']}: lookahead {', '.join(v.rsplit('L', 1)[1] for v in t['lookaheads'])}"
                f" trend not judged: {t['why']}"
            )
            continue
        out.append(
            f"- {t['model']}/{t['task']}: lookahead {', '.join(v.rsplit('L', 1)[1] for v in t['lookaheads'])}"
            f" -> {', '.join(f'{x:.3f}' for x in t['headline_means'])}"
            f" ({'declines' if t['declines_with_lookahead'] else 'does not decline monotonically'})"
        )
    for m, p in rep["pretrain"].items():
        if p:
            out.append(
                f"- pretrain {m}: {p.get('parameters') or 0:,} parameters, {p['steps']} steps"
                f"{' (early stop: no new validation minimum for train.early_stop_evals evaluations)' if p.get('early_stopped') else ''}, validation "
                f"loss {p['validation_curve'][0][1]:.3f} -> min {p['validation_loss_min']:.3f} (step "
                f"{p['validation_loss_min_step']}) -> end {p['validation_loss_end']:.3f} (flat over the last 20%: "
                f"{p['flattened']}, stopped improving: {p['stopped_improving']}, rising at end: "
                f"{p['rising_at_end']}); fine-tunes start from {_start(p)}"
                if p.get("validation_curve")
                else f"- pretrain {m}: no curve"
            )
    return "\n".join(out) + "\n"


def _start(p: dict[str, Any]) -> str:
    f = p.get("finetunes_start_from") or {}
    loss = f.get("validation_loss")
    what = "the best-validation weights" if f.get("checkpoint") == "best" else "the final checkpoint"
    return f"{what} (step {f.get('step')}" + (f", validation loss {loss:.3f})" if loss is not None else ")")


def _plot_pretrain(ax, model: str, p: dict[str, Any]) -> None:
    """The pretraining's validation curve, its minimum and the weights the fine-tunes started from."""
    curve = [(st, v) for st, v in p.get("validation_curve") or [] if _isfinite(v)]
    if not curve:
        ax.text(0.5, 0.5, "no pretraining record", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{model}: pretraining", fontsize=9)
        return
    ax.plot([st for st, _ in curve], [v for _, v in curve], marker=".", color="tab:gray")
    lo = min(curve, key=lambda sv: sv[1])
    ax.scatter([lo[0]], [lo[1]], color="tab:green", zorder=3, label=f"min {lo[1]:.3f} (step {lo[0]})")
    f = p.get("finetunes_start_from") or {}
    if _isfinite(f.get("validation_loss")) and f.get("step") is not None:
        ax.scatter([f["step"]], [f["validation_loss"]], marker="x", color="tab:red", zorder=4,
                   label=f"fine-tunes start ({f.get('checkpoint')})")
    later = [v for st, v in curve if st > 0]  # the y range without the random-init loss
    if later:
        ax.set_ylim(min(later) - 0.05 * abs(min(later)), max(later) + 0.05 * abs(max(later)))
    ax.set_xlabel("step", fontsize=8)
    ax.set_title(f"{model}: pretraining validation loss", fontsize=9)
    ax.legend(fontsize=7)


def plot(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in rep["models"] if any(c["model"] == m for c in rep["results"])]
    tasks = [t for t in rep["tasks"] if any(c["task"] == t for c in rep["results"])]
    if not models or not tasks:
        return
    pre = rep.get("pretrain") or {}
    curves = any((pre.get(m) or {}).get("validation_curve") for m in models)
    ncol = 2 * len(tasks) + (1 if curves else 0)
    fig, axes = plt.subplots(len(models), ncol, figsize=(4.2 * ncol, 3.4 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        if curves:
            _plot_pretrain(axes[i][ncol - 1], m, pre.get(m) or {})
        for j, t in enumerate(tasks):
            cs = [c for c in rep["results"] if c["model"] == m and c["task"] == t]
            ax = axes[i][2 * j]
            # a row whose runs all diverged (or whose numbers are otherwise not finite) gets no bar, and
            # its label says so; a row with some seeds diverged is marked with its finite-seed count
            labels, xs, means, stds, colors = [], [], [], [], []
            for k, c in enumerate(cs):
                h = c["headline"]
                label = c["variant"].replace("pregated-", "")
                ok = h["n"] > 0 and _isfinite(h["mean"]) and _isfinite(h["std"])
                if not ok:
                    label += "\ndiverged" if not h["n"] else "\nnot finite"
                elif c.get("diverged_seeds"):
                    label += f"\n{h['n']} of {c['n_runs']} finite"
                labels.append(label)
                if ok:
                    xs.append(k)
                    means.append(h["mean"])
                    stds.append(h["std"])
                    colors.append("tab:gray" if c["variant"] == "conventional" else "tab:blue")
            ax.bar(xs, means, yerr=stds, capsize=4, color=colors)
            ax.set_xticks(range(len(cs)), labels)
            if means:
                lo, hi = min(mm - s for mm, s in zip(means, stds)), max(mm + s for mm, s in zip(means, stds))
                pad = max(1e-6, 0.5 * (hi - lo) or 0.05 * abs(hi))
                ax.set_ylim(lo - pad, hi + pad)
            else:
                ax.text(0.5, 0.5, "every run diverged", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"{m} / {t}: {cs[0]['headline']['metric']}", fontsize=9)
            ax.set_ylabel(
                ("↑ " if cs[0]["headline"]["higher_is_better"] else "↓ ") + cs[0]["headline"]["metric"]
            )
            ax = axes[i][2 * j + 1]
            pg = [
                c
                for c in cs
                if _isfinite(c.get("agreement_at_conversion_mean")) and _isfinite(c.get("agreement_after_finetune_mean"))
            ]
            x = range(len(pg))
            ax.bar(
                [k - 0.2 for k in x],
                [c["agreement_at_conversion_mean"] for c in pg],
                0.4,
                label="at conversion",
            )
            ax.bar(
                [k + 0.2 for k in x],
                [c["agreement_after_finetune_mean"] for c in pg],
                0.4,
                label="fine-tuned",
            )
            ax.set_xticks(list(x), [c["variant"].replace("pregated-", "") for c in pg])
            ax.set_ylim(0, 100)
            ax.set_title(f"{m} / {t}: pre-gate agreement with the router (%)", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle("Pre-gated vs conventional fine-tuning (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--tasks", nargs="+", default=TASKS, choices=sorted(HEADLINE))
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    ap.add_argument("--steps", type=int, default=0, help="override the fine-tunes' train.max_steps")
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every fine-tune")
    ap.add_argument("--pretrain", action="store_true", help="run conf/experiment/pretrain_<model>.yaml first")
    ap.add_argument(
        "--pretrained",
        nargs="*",
        default=[],
        metavar="MODEL=DIR",
        help="pretrained checkpoint dirs (default: <root>/pretrain/<model>/checkpoint)",
    )
    ap.add_argument("--pretrain-steps", type=int, default=0)
    ap.add_argument("--pretrain-override", nargs="*", default=[])
    ap.add_argument(
        "--pretrain-nproc",
        type=int,
        default=1,
        help="GPUs per pretraining: > 1 runs it data-parallel (torchrun, DDP) with the same global batch",
    )
    ap.add_argument("--pretrain-only", action="store_true",
                    help="with --pretrain: only the pretraining runs (e.g. two recipes on two GPUs, each with "
                    "its own --root), no fine-tuning")
    ap.add_argument("--root", default=str(ROOT / "outputs" / "quality"), help="run directories")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (spread over the GPUs)")
    ap.add_argument("--gpus", default="auto", help="comma-separated GPU ids, or auto (all visible)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per run (0: cores / jobs)")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; stop launching after this")
    ap.add_argument("--grace", type=float, default=60, help="seconds after the budget before SIGTERM")
    ap.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every fine-tuned model's weights (default: only " + "/".join(map(str, KEEP)) + ")",
    )
    ap.add_argument(
        "--mps",
        action="store_true",
        help="start the CUDA MPS daemon for the runs, so their kernels share the GPU concurrently instead of "
        "time-slicing (needs nvidia-cuda-mps-control; without it the runs time-slice as usual)",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    ap.add_argument("--aggregate-only", action="store_true", help="only build the report from the run dirs")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    for v in a.variants:
        variant_overrides(v)
    if a.pretrain_nproc < 1:
        raise SystemExit(f"--pretrain-nproc {a.pretrain_nproc}: expected 1 or more")
    if a.pretrain_nproc > 1 and a.pretrain and not (a.dry_run or a.aggregate_only):
        gpus = gpu_ids(a.gpus)
        if 0 < len(gpus) < a.pretrain_nproc:
            raise SystemExit(f"--pretrain-nproc {a.pretrain_nproc} needs that many GPUs; --gpus gives {gpus}")
    jobs, ckpts = plan(a)
    if a.dry_run:
        for j in jobs:
            j.build()
            done = read_metrics(j.run_dir) is not None
            print(("# done: " if done else "") + " ".join(j.cmd))
        return 0
    if not a.aggregate_only:
        for j in jobs:
            if read_metrics(j.run_dir) is not None:
                j.status = "done"
        mps = start_mps(Path(a.root)) if a.mps else None
        try:
            execute(jobs, a)
        finally:
            if mps:
                stop_mps(mps)
    rep = aggregate(jobs, ckpts, a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(rep), indent=2, default=str) + "\n")
    md = markdown(rep)
    out.with_suffix(".md").write_text(f"<!-- {rep['command']} ({rep['date']}) -->\n" + md)
    try:
        plot(rep, out.with_suffix(".png"))
    except Exception as e:  # the numbers matter more than the picture
        print(f"[quality] plot failed: {e}", file=sys.stderr)
    print(md)
    print(f"[quality] wrote {out}, {out.with_suffix('.md').name}, {out.with_suffix('.png').name}")
    left = rep["runs"]["planned"] - rep["runs"]["finished"]
    if rep["runs"]["failed"]:
        print(f"[quality] failed runs: {rep['runs']['failed']}", file=sys.stderr)
        return 1
    if left and not a.aggregate_only:
        print(f"[quality] {left} runs not finished yet (call again to continue)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
