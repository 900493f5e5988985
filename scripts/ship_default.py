"""Make a fine-tuned checkpoint the default model of `python -m infer` (checkpoints/default/).

Stores the weights as symmetric per-row int8 (models.checkpoint.save_switch(quantize="int8"):
routers, pre-gates, norms and the position bias stay fp32) so that the `small` model (19M
parameters) ships in under 20 MB, copies the tokenizer files, writes recipe.json (where the
weights came from and how they were made), and records the validation metrics of both the
shipped int8 weights and the source weights through scripts/eval_checkpoint.py (CPU, fp32,
1 thread), so the cost of int8 storage is measured, not assumed.

    python scripts/ship_default.py outputs/quality/finetune/small/docsum/pregated-L1/seed0/checkpoint \\
        --run-dir outputs/quality/finetune/small/docsum/pregated-L1/seed0 \\
        --pretrain-dir outputs/quality/pretrain/small data=docsum eval.generate_examples=256
    python scripts/eval_checkpoint.py checkpoints/default --check     # what the test re-runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

MAX_BYTES = 20_000_000  # the limit for a model that ships with the repository


def run_summary(d: Path) -> dict:
    """What a `python -m train` run dir says about how it was made: its command-line overrides and
    final metrics (test and validation, without the per-block entries)."""
    import yaml

    out: dict = {"run_dir": str(d)}
    ov = d / ".hydra" / "overrides.yaml"
    if ov.exists():
        out["overrides"] = yaml.safe_load(ov.read_text())
    m = d / "metrics.json"
    if m.exists():
        mj = json.loads(m.read_text())
        out["steps"] = mj.get("step")
        for split in ("validation", "test"):
            if isinstance(mj.get(split), dict):
                out[split] = {k: v for k, v in mj[split].items() if "/" not in k}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a checkpoint directory (config.json + weights) of a pre-gated model")
    ap.add_argument("--out", default=str(ROOT / "checkpoints" / "default"))
    ap.add_argument("--split", default="validation")
    ap.add_argument("--run-dir", default=None, help="the fine-tune's run dir (.hydra/, metrics.json): its overrides "
                    "and final metrics go into recipe.json")
    ap.add_argument("--pretrain-dir", default=None, help="the pretraining run dir, likewise")
    ap.add_argument("--note", default="", help="a line of text for recipe.json")
    ap.add_argument("--no-quantize", action="store_true", help="keep the source dtype (the size check still applies)")
    ap.add_argument("overrides", nargs="*", help="eval_checkpoint overrides (data=..., eval....)")
    a = ap.parse_intermixed_args(argv)

    import eval_checkpoint
    import torch

    from models.checkpoint import load_switch, replace_dir, save_switch

    src, out = Path(a.source), Path(a.out)
    model = load_switch(src, dtype=torch.float32)
    if not model.cfg.pregated:
        raise SystemExit(f"{src}: not a pre-gated model (config.json pregated=false); the default model must be one")
    # the tokenizer's files (this project's byte tokenizer, or a checkpoint's own text files)
    tok_files = {p.name: p.read_text() for p in src.iterdir()
                 if p.is_file() and ("tokenizer" in p.name or p.name == "special_tokens_map.json")}
    recipe = {
        "source": str(src),
        "storage": "fp32/bf16 as the source" if a.no_quantize else "int8 per-row (routers, pre-gates, norms fp32)",
        "note": a.note,
        "command": " ".join(["python", "scripts/ship_default.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    for key, d in (("finetune", a.run_dir), ("pretrain", a.pretrain_dir)):
        if d:
            recipe[key] = run_summary(Path(d))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ship-", dir=out.parent))
    try:
        save_switch(model, tmp / "ckpt", quantize=None if a.no_quantize else "int8",
                    extra_files={**tok_files, "recipe.json": json.dumps(recipe, indent=2) + "\n"})
        size = sum(p.stat().st_size for p in (tmp / "ckpt").glob("*.safetensors"))
        if size > MAX_BYTES:
            raise SystemExit(f"{src}: the weights take {size / 1e6:.2f} MB, over the {MAX_BYTES / 1e6:.0f} MB "
                             "a shipped model may take; train a smaller model")
        shipped = eval_checkpoint.record(tmp / "ckpt", a.split, a.overrides)
        source = eval_checkpoint.evaluate_checkpoint(src, a.split, a.overrides)
        shipped["weights_bytes"] = size
        shipped["source_metrics"] = source["metrics"]
        shown = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
        shipped["command"] = shipped["command"].replace(str(tmp / "ckpt"), str(shown))
        (tmp / "ckpt" / eval_checkpoint.METRICS_FILE).write_text(json.dumps(shipped, indent=2) + "\n")
        replace_dir(tmp / "ckpt", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = [k for k in ("loss", "token_accuracy", "rouge1", "rouge2", "rougeL") if k in shipped["metrics"]]
    print(f"wrote {out} ({size / 1e6:.2f} MB of weights)")
    for k in keys:
        print(f"  {k}: shipped {shipped['metrics'][k]:.4f}   source {source['metrics'][k]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
