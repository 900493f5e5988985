"""Evaluate a checkpoint on one split of a task through `python -m train`'s own evaluation code
(train.loop.evaluate: loss, token accuracy, the task metric, per-block expert loads and pre-gate
agreement), deterministically on the CPU (fp32, one thread, no jitter, greedy decoding).

    python scripts/eval_checkpoint.py checkpoints/default                      # print the metrics
    python scripts/eval_checkpoint.py checkpoints/default --write               # -> <ckpt>/metrics.json
    python scripts/eval_checkpoint.py CKPT --split test data=span eval.max_examples=64

Trailing KEY=VALUE arguments are Hydra overrides of conf/train.yaml (the data group, train.max_input_len,
eval.*); the defaults are the app's, which are the ones the shipped default model was trained and
evaluated with. `--write` records the overrides next to the metrics, so `check(ckpt)` (and
tests/train/test_default_checkpoint.py) re-runs exactly the same evaluation and compares.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METRICS_FILE = "metrics.json"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import train.config

    train.config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def evaluate_checkpoint(
    ckpt: str | Path, split: str = "validation", overrides: list[str] = ()
) -> dict[str, Any]:
    """The metrics of train.loop.evaluate for `ckpt` on `split` (CPU, fp32, one thread)."""
    import torch

    from models.checkpoint import load_switch
    from models.tokenizer import load_tokenizer
    from train.data import build_task
    from train.loop import Dist, encode, evaluate

    cfg = compose([*overrides, f"init.checkpoint={ckpt}", "train.device=cpu", "train.precision=fp32"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg.seed)
        model = load_switch(ckpt, dtype=torch.float32)
        tok = load_tokenizer(ckpt, vocab_size=model.cfg.vocab_size)
        task = build_task(cfg.data)
        data = encode(task, split, tok, cfg)
        metrics, _rows = evaluate(model, data, task, tok, cfg, Dist(), probe=bool(model.cfg.pregated))
    finally:
        torch.set_num_threads(threads)
    example = metrics.pop("_example", None)
    n = len(data) if not cfg.eval.max_examples else min(len(data), cfg.eval.max_examples)
    return {"metrics": metrics, "example": example, "examples": n, "task": task.name, "metric": task.metric}


def record(ckpt: str | Path, split: str, overrides: list[str]) -> dict[str, Any]:
    import torch

    res = evaluate_checkpoint(ckpt, split, overrides)
    return {
        "what": "train.loop.evaluate on this checkpoint (CPU, fp32, 1 thread); re-run: "
        "python scripts/eval_checkpoint.py <this dir> --check",
        "split": split,
        "overrides": list(overrides),
        **res,
        "command": " ".join(
            ["python", "scripts/eval_checkpoint.py", str(ckpt), "--split", split, *overrides]
        ),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# Tolerances of check(): the loss is an fp32 mean over thousands of tokens (summation order may differ
# between torch builds/CPUs); accuracy and ROUGE are counts over discrete tokens (a near-tie flipped
# by that noise moves them by one token's worth).
TOLERANCE = {"loss": 1e-4, "token_accuracy": 0.05, "rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5}


def check(ckpt: str | Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(recorded, recomputed, mismatches) for the metrics.json next to `ckpt`."""
    rec = json.loads((Path(ckpt) / METRICS_FILE).read_text())
    now = evaluate_checkpoint(ckpt, rec["split"], rec["overrides"])
    bad = []
    for k, tol in TOLERANCE.items():
        if k in rec["metrics"]:
            a, b = rec["metrics"][k], now["metrics"].get(k)
            if b is None or abs(a - b) > tol:
                bad.append(f"{k}: recorded {a}, now {b} (tolerance {tol})")
    return rec, now, bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    ap.add_argument("--write", action="store_true", help=f"write <checkpoint>/{METRICS_FILE}")
    ap.add_argument("--check", action="store_true", help=f"re-run <checkpoint>/{METRICS_FILE} and compare")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml (data=..., eval....)")
    a = ap.parse_args(argv)
    if a.check:
        rec, now, bad = check(a.checkpoint)
        main_keys = [k for k in TOLERANCE if k in rec["metrics"]]
        for k in main_keys:
            print(f"{k}: recorded {rec['metrics'][k]:.6f}  now {now['metrics'][k]:.6f}")
        print("MISMATCH:\n  " + "\n  ".join(bad) if bad else "OK: reproduces the recorded metrics")
        return 1 if bad else 0
    out = record(a.checkpoint, a.split, a.overrides)
    text = json.dumps(out, indent=2) + "\n"
    if a.write:
        (Path(a.checkpoint) / METRICS_FILE).write_text(text)
        print(f"wrote {Path(a.checkpoint) / METRICS_FILE}")
    print(json.dumps({k: round(v, 4) for k, v in out["metrics"].items() if "/" not in k}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
