"""Data-parallel training on several GPUs: throughput scaling, loss-curve agreement, sharded memory.

    python3 scripts/bench_train_dp.py --out bench/results/train-2gpu.json      # a 2-GPU machine
    python3 scripts/bench_train_dp.py --tiny --out /tmp/dp.json                # CPU smoke test (gloo)

Every run is `python -m train` (pre-gate fine-tuning: random init converted to pre-gated with
lookahead 1, span-corruption data, bf16 autocast on GPUs, AdamW), launched as a subprocess:

  one        1 GPU, global batch N*b as N micro-batches of b (train.grad_accum=N)
  one_b      1 GPU, batch b (an optimizer step per b): the weak-scaling reference (scaling_*_vs_one_b)
  two        N GPUs under torchrun (DDP), global batch N*b: b per GPU
  two_bf16   as `two`, gradients all-reduced in bf16 (train.ddp_grad_dtype=bf16): a lever, measured
  two_fsdp   as `two` under FSDP (parameters, gradients and AdamW state sharded; bf16 gathers): a lever
  sharded    the large shape under FSDP on N GPUs (parameters all-gathered in bf16), pre-gate-only
             fine-tuning (full AdamW fine-tuning of it does not fit N H200s; see memory_estimates)

`one` and `two` run the same micro-batches (rank r of `two` takes the rows that micro-step r of `one`
takes) with dropout and router jitter off, so their loss curves agree up to floating-point order.
Scaling is tokens/s(two) / tokens/s(one): the same work per optimizer step and the same per-GPU
batch b; the 1-GPU run amortises its optimizer step over N micro-batches, which makes the ratio a
conservative one. Tokens/s of a run: the median of its logged windows (train.log_every steps each)
after the first --warmup-steps steps. Peak memory: rank 0's torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALING_TARGET = 1.8
# loss curves of `one` and `two` agree when every logged training loss differs by at most MAX_REL
# (relative) and the means of the last 5 logged losses by at most TAIL_REL
MAX_REL, TAIL_REL = 0.02, 0.01


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON path (a <name>-logs folder beside it keeps the logs)")
    ap.add_argument("--model", default="switch-base-128")
    ap.add_argument("--large-model", default="switch-large-128")
    ap.add_argument("--nproc", type=int, default=2, help="GPUs (processes) of the data-parallel runs")
    ap.add_argument("--per-gpu-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--large-steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=20, help="windows ending at or before this are skipped")
    ap.add_argument("--runs", nargs="+", default=["one", "two", "two_bf16", "sharded"],
                    choices=["one", "one_b", "two", "two_bf16", "two_fsdp", "sharded"])
    ap.add_argument("--run-timeout", type=float, default=420, help="seconds per run")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, few steps, gloo")
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    a = ap.parse_args(argv)
    if a.tiny:
        a.model = a.large_model = "tiny"
        a.per_gpu_batch, a.steps, a.large_steps, a.log_every, a.warmup_steps = 4, 6, 4, 2, 2
    return a


def common_overrides(a: argparse.Namespace, model: str, steps: int) -> list[str]:
    ov = [
        f"model={model}",
        "data=span",
        f"train.max_steps={steps}",
        f"train.log_every={a.log_every}",
        "train.eval_every=0",
        "eval.at_start=false",
        "eval.test=false",
        "eval.generate_examples=0",
        f"eval.max_examples={8 if a.tiny else 64}",
        "train.save_at_end=false",
        "train.init_on_device=true",
        "train.progress=false",
        # deterministic model: the only difference between `one` and `two` is the reduction order
        "model.dropout_rate=0.0",
        "model.router_jitter_noise=0.0",
        "optim.lr=5e-4",
        "optim.warmup_steps=20",
        "logger=none",
        "seed=0",
    ]
    if a.tiny:
        ov += ["train.max_input_len=64", "train.max_target_len=32", "train.threads=1"]
    return [*ov, *a.override]


def plan(a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    n, b = a.nproc, a.per_gpu_batch
    base = common_overrides(a, a.model, a.steps)
    gpus = ",".join(str(i) for i in range(n))
    runs = {
        "one": {"nproc": 1, "gpus": "0", "overrides": [*base, f"train.batch_size={n * b}", f"train.grad_accum={n}"]},
        "one_b": {"nproc": 1, "gpus": "0", "overrides": [*base, f"train.batch_size={b}"]},
        "two": {"nproc": n, "gpus": gpus, "overrides": [*base, f"train.batch_size={n * b}"]},
        "two_bf16": {"nproc": n, "gpus": gpus,
                     "overrides": [*base, f"train.batch_size={n * b}", "train.ddp_grad_dtype=bf16"]},
        "two_fsdp": {"nproc": n, "gpus": gpus,
                     "overrides": [*base, f"train.batch_size={n * b}", "train.parallel=fsdp",
                                   *([] if a.tiny else ["train.fsdp_param_dtype=bf16"])]},
        "sharded": {
            "nproc": n,
            "gpus": gpus,
            "overrides": [
                *common_overrides(a, a.large_model, a.large_steps),
                f"train.batch_size={n * b}",
                "train.parallel=fsdp",
                "train.trainable=pregates",
                *([] if a.tiny else ["train.fsdp_param_dtype=bf16"]),
            ],
        },
    }
    return {k: runs[k] for k in a.runs}


def command(nproc: int, overrides: list[str], run_dir: Path) -> list[str]:
    launch = [sys.executable, "-m", "train"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                  "-m", "train"]
    return [*launch, *overrides, f"hydra.run.dir={run_dir}"]


def windows(metrics: dict[str, Any], warmup: int, key: str = "tokens_per_s") -> list[float]:
    return [h[key] for h in metrics.get("history", [])
            if h.get("split") == "train" and h["step"] > warmup and h.get(key) is not None]


def phases(metrics: dict[str, Any], warmup: int) -> dict[str, float | None]:
    """Median seconds per step of forward + backward (DDP's all-reduce included) and of clip + optimizer
    step, over the logged windows after the warm-up (rank 0's clock; train/loop.py's history)."""
    out: dict[str, float | None] = {}
    for key in ("fwd_bwd_s", "optim_s"):
        w = windows(metrics, warmup, key)
        out[f"{key}_median"] = statistics.median(w) if w else None
    return out


def curve(metrics: dict[str, Any]) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in metrics.get("history", []) if h.get("split") == "train"]


def agreement(c1: list[tuple[int, float]], c2: list[tuple[int, float]]) -> dict[str, Any]:
    d1, d2 = dict(c1), dict(c2)
    steps = sorted(set(d1) & set(d2))
    if not steps:
        return {"agree": False, "reason": "no common logged steps"}
    rel = [abs(d1[s] - d2[s]) / max(abs(d1[s]), 1e-12) for s in steps]
    tail = steps[-5:]
    m1, m2 = statistics.fmean(d1[s] for s in tail), statistics.fmean(d2[s] for s in tail)
    tail_rel = abs(m1 - m2) / max(abs(m1), 1e-12)
    return {
        "steps": steps,
        "max_rel_diff": max(rel),
        "max_rel_diff_at": steps[rel.index(max(rel))],
        "tail_mean_one": m1,
        "tail_mean_two": m2,
        "tail_rel_diff": tail_rel,
        "criteria": f"every logged loss within {MAX_REL:.0%} relative and the last-5 means within {TAIL_REL:.0%}",
        "agree": max(rel) <= MAX_REL and tail_rel <= TAIL_REL,
    }


def param_count(model: str) -> int:
    import torch

    from models.config import preset
    from models.switch import Switch

    with torch.device("meta"):
        m = Switch(preset(model))
    return sum(p.numel() for p in m.parameters())


def memory_estimates(a: argparse.Namespace) -> dict[str, Any]:
    """Parameter, gradient and optimizer state per GPU (bytes), no activations."""
    out: dict[str, Any] = {"gpu_memory_gb": 141.0, "nproc": a.nproc}
    for name in {a.model, a.large_model}:
        n = param_count(name)
        out[name] = {
            "parameters": n,
            "full_adamw_ddp_gb": 16 * n / 1e9,  # fp32 weights + gradients + 2 AdamW moments, on every GPU
            "full_adamw_fsdp_gb": 16 * n / a.nproc / 1e9,  # the same, sharded over the GPUs
            "pregates_only_ddp_gb": (4 + 2) * n / 1e9,  # fp32 weights + their bf16 casts kept for backward
            "pregates_only_fsdp_bf16_gb": 4 * n / a.nproc / 1e9,  # fp32 shards (+ one unit gathered in bf16)
        }
    return out


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        try:
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # pragma: no cover
            pass
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
    except OSError:  # pragma: no cover
        pass
    return env


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    out = Path(a.out)
    logs = out.parent / (out.stem + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    if not a.tiny:
        import torch

        if torch.cuda.device_count() < a.nproc:
            raise SystemExit(f"--nproc {a.nproc} needs that many GPUs; {torch.cuda.device_count()} visible "
                             "(--tiny runs the CPU smoke test)")
    rep: dict[str, Any] = {
        "benchmark": "train_data_parallel",
        "command": " ".join(["python3", "scripts/bench_train_dp.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "what": __doc__.split("\n\n", 2)[2].strip(),
        "settings": {k: getattr(a, k) for k in ("model", "large_model", "nproc", "per_gpu_batch", "steps",
                                               "large_steps", "log_every", "warmup_steps", "tiny")},
        "environment": environment(),
        "memory_estimates": memory_estimates(a),
        "runs": {},
    }

    def save() -> None:
        out.write_text(json.dumps(rep, indent=2, default=str) + "\n")

    for name, r in plan(a).items():
        run_dir = logs / name
        cmd = command(r["nproc"], r["overrides"], run_dir)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "WANDB_MODE": "disabled"}
        if not a.tiny:
            env["CUDA_VISIBLE_DEVICES"] = r["gpus"]
        else:
            env.setdefault("OMP_NUM_THREADS", "1")
        print(f"[dp] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "train.log", "w") as log:
            try:
                p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   timeout=a.run_timeout)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        wall = time.perf_counter() - t0
        res: dict[str, Any] = {"command": " ".join(cmd[1:]), "nproc": r["nproc"], "rc": rc, "wall_s": wall}
        mpath = run_dir / "metrics.json"
        if rc == 0 and mpath.exists():
            m = json.loads(mpath.read_text())
            w = windows(m, a.warmup_steps)
            res.update({
                "steps": m["step"],
                "tokens_per_s_median": statistics.median(w) if w else None,
                "tokens_per_s_windows": w,
                **phases(m, a.warmup_steps),
                "whole_run_tokens_per_s": m.get("train_tokens_per_s"),
                "peak_allocated_gib_rank0": m.get("cuda_peak_allocated_gib"),
                "peak_reserved_gib_rank0": m.get("cuda_peak_reserved_gib"),
                "param_memory_rank0": m.get("param_memory"),
                "validation_loss_end": (m.get("validation") or {}).get("loss"),
                "loss_curve": curve(m),
                "nonfinite_steps": m.get("nonfinite_steps"),
            })
        else:
            res["log_tail"] = (run_dir / "train.log").read_text()[-3000:]
        rep["runs"][name] = res
        tps = res.get("tokens_per_s_median")
        fb, op = res.get("fwd_bwd_s_median"), res.get("optim_s_median")
        print(f"[dp] {name}: rc={rc}, {wall:.0f} s" + (f", {tps:,.0f} tokens/s" if tps else "")
              + (f", per step: forward+backward {1e3 * fb:.0f} ms, clip+optimizer {1e3 * op:.0f} ms"
                 if fb is not None and op is not None else ""), flush=True)
        save()

    runs = rep["runs"]
    for ref in ("one", "one_b"):  # one: N micro-batches per optimizer step; one_b: one (batch b per step)
        one = runs.get(ref, {}).get("tokens_per_s_median")
        for two in ("two", "two_bf16", "two_fsdp"):
            t = runs.get(two, {}).get("tokens_per_s_median")
            if one and t:
                key = f"scaling_{two}" + ("" if ref == "one" else "_vs_one_b")
                rep[key] = {"ratio": t / one, "target": SCALING_TARGET, "met": t / one >= SCALING_TARGET,
                            "one_tokens_per_s": one, "two_tokens_per_s": t, "one_run": ref}
    for two in ("two", "two_bf16", "two_fsdp"):
        if runs.get("one", {}).get("loss_curve") and runs.get(two, {}).get("loss_curve"):
            rep[f"agreement_one_vs_{two}"] = agreement(runs["one"]["loss_curve"], runs[two]["loss_curve"])
    save()
    for k in [k for k in rep if k.startswith(("scaling_", "agreement_"))]:
        print(f"[dp] {k}: " + json.dumps({x: y for x, y in rep[k].items() if x != "steps"}), flush=True)
    print(f"[dp] wrote {out}")
    return 0 if all(r["rc"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
