"""`python -m infer`: load a checkpoint with its experts offloaded, generate the task's test split under
each policy, check every policy's tokens against gpu_only, and report quality, speed and memory.

Kept free of Hydra imports (infer/__main__.py is the Hydra entry), so scripts can call `run`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from infer import native_copier
from infer import report as rep
from infer.engine import Engine, RunResult, load_offloaded
from infer.offload import GB, CopySettings, ExpertStore, default_budget_bytes, request_eager_module_loading
from infer.policies import PolicySpec, guess_mode
from models.checkpoint import load_config

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def policy_specs(cfg, cache_size: int | None = None) -> list[PolicySpec]:
    """The policies to run; cache_size: what cache.size=auto resolved to (None before loading: 0)."""
    names = (
        list(cfg.policies)
        if cfg.policies
        else (list(cfg.policy.names) if cfg.policy.name == "compare" else [cfg.policy.name])
    )
    if not names:
        raise ValueError("no policy to run: set policy=<name> or policies=[...]")
    size = cache_size_setting(cfg.cache.size)
    if size == "auto":
        size = 0 if cache_size is None else cache_size
    return [PolicySpec.parse(n, 0 if n == "gpu_only" else size, cfg.cache.kind) for n in names]


def cache_size_setting(value) -> int | str:
    """cache.size as given: a non-negative int or "auto"; anything else is an error naming the key."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or (isinstance(value, float) and value != n):
        raise ValueError(f"cache.size={value!r}: expected a number of slots >= 0 or auto")
    return n


def auto_cache_size(cfg, store, device: torch.device) -> tuple[int, str]:
    """cache.size=auto: the slots per MoE block that fit the GPU memory the caches may take
    (cache.budget_gb, else the free memory now, after loading, minus cache.reserve_gb), capped at the
    number of experts; with the reason, for the report. A slot holds a GPU row (compressed stores: the unpacked bf16
    row, plus the packed row a decode copy lands in when the caches' landing rows get their own memory)."""
    slot_bytes = store.slot_bytes + (store.row_bytes if store.compress else 0)
    per_slot = store.M * slot_bytes  # one slot in every MoE block
    if cfg.cache.budget_gb is not None:
        budget, how = float(cfg.cache.budget_gb) * GB, f"cache.budget_gb={cfg.cache.budget_gb}"
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free - float(cfg.cache.reserve_gb) * GB
        how = f"free GPU memory {free / GB:.2f} GB - cache.reserve_gb={cfg.cache.reserve_gb}"
    else:
        return 0, "no GPU and no cache.budget_gb: auto gives no cache"
    size = max(0, min(store.E, int(budget // per_slot)))
    return size, f"{how} -> {size} slots x {store.M} blocks x {slot_bytes / 1e6:.1f} MB"


def default_checkpoint(cfg) -> Path:
    """The shipped default model; when it is missing, build a stand-in with the project's own training
    (`python -m train`: the default tiny pre-gated model on the embedded data, bounded steps)."""
    d = Path(cfg.default_model.dir)
    d = d if d.is_absolute() else ROOT / d
    if (d / "config.json").exists():
        return d
    out = d.parent / f".{d.name}-train"
    print(
        f"[infer] {d} is missing: training it with `python -m train` "
        f"({cfg.default_model.train_steps} steps) ...",
        flush=True,
    )
    cmd = [
        sys.executable,
        "-m",
        "train",
        f"train.max_steps={cfg.default_model.train_steps}",
        f"train.out_dir={out}",
        f"hydra.run.dir={out}/hydra",
        "train.progress=false",
        "logger=none",
        *cfg.default_model.train_overrides,
    ]
    t = time.perf_counter()
    subprocess.run(
        cmd,
        cwd=ROOT,
        check=True,
        timeout=cfg.default_model.train_timeout_s,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    ckpt = out / "checkpoint"
    if not (ckpt / "config.json").exists():
        raise FileNotFoundError(f"training finished but wrote no checkpoint at {ckpt}")
    (ckpt / "training_state.pt").unlink(missing_ok=True)  # optimizer state: not needed to serve
    d.parent.mkdir(parents=True, exist_ok=True)
    os.replace(ckpt, d)
    shutil.rmtree(out, ignore_errors=True)
    print(f"[infer] built {d} in {time.perf_counter() - t:.0f} s", flush=True)
    return d


def _batches(rows: list[list[int]], size: int):
    from models.tokenizer import pad_batch

    for i in range(0, len(rows), size):
        yield i, pad_batch(rows[i : i + size])


def run(cfg, run_dir: str | Path) -> dict[str, Any]:
    from models.tokenizer import load_tokenizer
    from train.data import build_task
    from train.metrics import score
    from train.tracking import Tracker

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if str(cfg.offload.copy_mode) == "dma" and not native_copier.usable(str(cfg.offload.dma_api)):
        request_eager_module_loading()  # a Python copier thread needs it, before the first CUDA call (offload.py)
    device = resolve_device(cfg.device)
    if cfg.threads or device.type == "cpu":
        # auto on the CPU: one thread. The shipped model's matrices are far too small to split, and
        # spinning OpenMP workers on a shared 2-core machine cost 5-10x (measured).
        torch.set_num_threads(cfg.threads or 1)
    torch.manual_seed(cfg.seed)
    dtype = resolve_dtype(cfg.dtype, device)
    specs = policy_specs(cfg)  # validates the names (and cache.size) before anything is loaded
    copy = CopySettings(str(cfg.offload.copy_priority), int(cfg.offload.copy_programs),
                        int(cfg.offload.copy_block), int(cfg.offload.copy_warps),
                        str(cfg.offload.dma_api))  # checked before loading
    guess = guess_mode(cfg.offload.first_block_guess)  # likewise
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else default_checkpoint(cfg)
    budget = (
        cfg.offload.pinned_budget_gb * GB
        if cfg.offload.pinned_budget_gb is not None
        else default_budget_bytes()
    )
    quantize = None if str(cfg.offload.quantize) == "none" else str(cfg.offload.quantize)
    if not float(cfg.offload.expv_min_mib) >= 0:
        raise ValueError(f"offload.expv_min_mib={cfg.offload.expv_min_mib!r}: expected MiB >= 0")
    settings = (cfg.offload.compress, device, dtype, quantize, str(cfg.offload.cpu_compute), str(cfg.offload.copy_mode))
    compress, compress_note = ExpertStore.resolve_compress(*settings)
    ExpertStore.check_settings(dtype, quantize, compress)  # before the checkpoint is read
    if compress and str(cfg.offload.compress) == "auto" and (ckpt / "config.json").is_file():  # by the experts' size
        compress, compress_note = ExpertStore.resolve_compress(
            *settings, load_config(ckpt).expert_bytes(2), float(cfg.offload.expv_min_mib) * 2**20)
    # (checks quantize and compress before loading)
    model, store = load_offloaded(ckpt, device, dtype, budget, quantize, compress,
                                  fallback=str(cfg.offload.compress) == "auto")
    if str(cfg.offload.compress) == "auto" and compress != store.compress:
        compress_note = (f"offload.compress=auto: {store.compress or 'none'} (an expert did not pack losslessly as "
                         f"{compress})")
    cache_note = None
    if cache_size_setting(cfg.cache.size) == "auto":
        size, cache_note = auto_cache_size(cfg, store, device)
        specs = policy_specs(cfg, cache_size=size)
        print(f"[infer] cache.size=auto: {cache_note}", flush=True)
    if device.type == "cuda":
        model.set_backend("triton")  # fused routing and the slot-table expert FFN; no host syncs
    if not cfg.checkpoint and cfg.model.name and model.cfg.d_model != cfg.model.d_model:
        print(
            f"[infer] note: the default checkpoint is not a `{cfg.model.name}` model; pass checkpoint=PATH "
            "to run another model",
            flush=True,
        )
    tok = load_tokenizer(ckpt, vocab_size=model.cfg.vocab_size)
    task = build_task(cfg.data)
    examples = task.examples(cfg.split)
    if cfg.num_examples:
        examples = examples[: cfg.num_examples]
    inputs = [tok.encode(e.input, max_length=cfg.max_input_tokens) for e in examples]
    refs = [e.references for e in examples]
    warm = str(cfg.warmup).lower() != "false"
    eng = Engine(
        model,
        store,
        device,
        cuda_graph=cfg.cuda_graph,
        copy_mode=cfg.offload.copy_mode,
        measure_stall=cfg.measure_stall,
        cpu_compute=str(cfg.offload.cpu_compute),
        link_GBps=cfg.offload.link_GBps,
        cpu_overhead_ms=cfg.offload.cpu_overhead_ms,
        prefill_slots=int(cfg.offload.prefill_slots),
        copy=copy,
        first_block_guess=guess,
    )
    peak = rep.pinned_peak_GBps(device)
    env = rep.environment(device)
    if cache_note is not None:
        env["cache_auto"] = cache_note
    env.update(
        checkpoint=str(ckpt),
        pinned_store_bytes=store.total_bytes,
        store_pinned=store.pinned,
        expert_quantize=store.quantize or "none",
        expert_compress=store.compress or "none",
        expert_compress_setting=compress_note,
        expert_bytes=store.expert_bytes,
        model_dtype=str(dtype).replace("torch.", ""),
    )
    if eng.cpu_compute != "off":  # the cost model's numbers, measured once on this store
        env["cpu_compute"] = eng.cpu_compute
        env["cpu_compute_calibration"] = eng.calibration().as_dict()
    print(
        f"[infer] {ckpt.name}: {model.cfg.num_experts} experts x {store.M} MoE blocks "
        f"({store.total_bytes / 1e6:.1f} MB of experts in {'pinned ' if store.pinned else ''}CPU memory"
        f"{', packed by ' + store.compress if store.compress else ''}), "
        f"pregated={model.cfg.pregated}, device={env['compute_device']}, data={task.name} "
        f"{cfg.split} ({len(examples)} examples), batch {cfg.batch_size}, beams {cfg.num_beams}",
        flush=True,
    )

    entries: list[dict[str, Any]] = []
    ref_tokens = None
    for spec in specs:
        runs: list[RunResult] = []
        tokens: list[list[int]] = []
        for i, batch in _batches(inputs, cfg.batch_size):
            res = eng.run(
                spec,
                batch["input_ids"],
                batch["attention_mask"],
                max_new_tokens=cfg.max_new_tokens,
                num_beams=cfg.num_beams,
                warmup=warm and i == 0,
            )
            runs.append(res)
            tokens += res.tokens
        preds = tok.batch_decode(tokens)
        quality = score(task.metric, preds, refs) if task.metric != "loss" else {}
        entry = {
            "policy": spec.label,
            "spec": vars(spec),
            "metrics": rep.aggregate(runs, peak),
            "quality": quality,
            "notes": sorted({n for r in runs for n in r.notes}),
            "tokens": tokens,
            "predictions": preds[:8],
        }
        if spec.name == "gpu_only":
            ref_tokens = tokens
        entries.append(entry)
        print(
            f"[infer] {spec.label}: done ({sum(r.metrics['total_ms'] for r in runs) / 1e3:.1f} s)", flush=True
        )
    for e in entries:
        e["same_as_gpu_only"] = None if ref_tokens is None else e["tokens"] == ref_tokens

    qkey = {"rouge": "rougeL", "em_f1": "exact_match"}.get(task.metric)
    title = (
        f"{ckpt.name} on {env['compute_device']}, {task.name} {cfg.split} x{len(examples)}, "
        f"batch {cfg.batch_size}, beams {cfg.num_beams}, {cfg.max_new_tokens} new tokens"
    )
    text = rep.table(entries, qkey)
    report = {
        "title": title,
        "environment": env,
        "config": _plain(cfg),
        "task": {"name": task.name, "metric": task.metric},
        "references": [r[0] for r in refs[:8]],
        "entries": entries,
        "table": text,
        "wall_s": time.perf_counter() - t_start,
    }
    rep.write_json(run_dir / "report.json", report)
    png = rep.plot(run_dir / "policies.png", entries, title)
    print(f"\n{title}\n{text}\n")
    for e in entries:
        for n in e["notes"]:
            print(f"[infer] note ({e['policy']}): {n}")
    if device.type == "cpu":
        print(
            "[infer] CPU-only machine: the CPU is the compute device; "
            "no GPU memory or copy figures are reported."
        )
    print(f"[infer] report: {run_dir / 'report.json'}, plot: {png}")
    tracker = Tracker(cfg.logger, _plain(cfg), "infer", run_dir, name=run_dir.name)
    tracker.table("policies", list(rep.COLUMNS), rep.rows(entries, qkey))
    for e in entries:
        tracker.log(
            {
                f"{e['policy']}/{k}": v
                for k, v in {**e["metrics"], **e["quality"]}.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
    tracker.image("policies", png)
    tracker.finish()
    store.close()
    return report


def _plain(cfg) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return cfg
