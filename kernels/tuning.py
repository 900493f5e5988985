"""Kernel configs: hand-picked defaults, a table tuned per GPU (kernels/configs/<gpu>.json), and an opt-in
autotuner (env PGMOE_AUTOTUNE=1) that times candidates on first use and caches the winner for the process.

A config is a plain dict; its key is (kernel, E, d, F, token bucket, gpu); the token bucket is T rounded
up to a power of two. E is the model's expert count, never the number of weight slots an offloaded call
reads from, and T the token count of the whole batch a call is part of (kernels.expert_ffn.choose_config):
every offload policy then runs each token with gpu_only's kernels and tiles (bitwise the same outputs).
Lookups never synchronize the host, so a capturing CUDA graph only ever takes the table or the default
(the autotuner is skipped while a stream is capturing).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
from collections.abc import Callable

import torch

CONFIG_DIR = pathlib.Path(__file__).with_name("configs")
_chosen: dict[tuple[str, str], dict] = {}  # (gpu, key) -> config, filled on first use
history: list[dict] = []  # every autotune: key and each candidate's time (benchmarks report it)


def gpu_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_name(index)


@functools.cache
def _cuda_name(index: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(index).lower()).strip("-")


def token_bucket(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def config_key(kernel: str, E: int, d: int, F: int, n_tokens: int, *dtypes: torch.dtype) -> str:
    """E.g. 'ffn:E128:d768:F3072:T256'; dtypes other than bf16 are named ('route-float32-float32:...'),
    since tiles tuned for bf16 need twice the shared memory in fp32."""
    if any(dt != torch.bfloat16 for dt in dtypes):
        kernel += "".join("-" + str(dt).removeprefix("torch.") for dt in dtypes)
    return f"{kernel}:E{E}:d{d}:F{F}:T{token_bucket(n_tokens)}"


@functools.cache
def _table(gpu: str) -> dict[str, dict]:
    path = CONFIG_DIR / f"{gpu}.json"
    return json.loads(path.read_text())["configs"] if path.exists() else {}


def autotune_enabled() -> bool:
    return os.environ.get("PGMOE_AUTOTUNE", "0") == "1"


def pick(
    key: str,
    device: torch.device,
    default: Callable[[], dict],
    candidates: Callable[[], list[dict]] | None = None,
    run: Callable[[dict], None] | None = None,
) -> dict:
    """The config for `key` on `device`: chosen before > tuned table > autotune (opt-in) > default."""
    gpu = gpu_name(device)
    cfg = _chosen.get((gpu, key))
    if cfg is not None:
        return cfg
    cfg = _table(gpu).get(key)
    if cfg is None and candidates is not None and run is not None and _can_autotune(device):
        cfg = autotune(candidates(), run, key=f"{gpu}|{key}")
    if cfg is None:
        cfg = default()
    _chosen[(gpu, key)] = cfg
    return cfg


def _can_autotune(device: torch.device) -> bool:
    return autotune_enabled() and device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def autotune(
    candidates: list[dict], run: Callable[[dict], None], reps: int = 20, key: str = ""
) -> dict | None:
    """Time each candidate (CUDA events, median of `reps`) and return the fastest; skips ones that fail."""
    best, best_ms, times = None, float("inf"), []
    for cfg in candidates:
        try:
            ms = time_cuda(lambda cfg=cfg: run(cfg), reps=reps)
        except Exception as e:  # a candidate that does not compile here (shared memory, registers) is skipped
            times.append({"config": cfg, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        times.append({"config": cfg, "us": 1000 * ms})
        if ms < best_ms:
            best, best_ms = dict(cfg), ms
    history.append({"key": key, "candidates": times})
    return best


_l2_flush: torch.Tensor | None = None


def time_cuda(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Median ms of fn, each rep after reading 256 MB (more than any L2) so weights come from HBM."""
    global _l2_flush
    if _l2_flush is None:
        _l2_flush = torch.ones(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        _l2_flush.max()  # a read: no dirty lines left whose write-back the timed call would pay
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[reps // 2]


def current(key: str, device: torch.device) -> dict | None:
    """The config already in use for `key` (None before the first call)."""
    return _chosen.get((gpu_name(device), key))


def chosen(gpu: str) -> dict[str, dict]:
    """Every config used so far on `gpu` (to write a tuned table)."""
    return {key: cfg for (g, key), cfg in sorted(_chosen.items()) if g == gpu}


def set_config(key: str, device: torch.device, cfg: dict | None) -> None:
    """Pin (or with None forget) the config for `key`, e.g. from a benchmark's own sweep."""
    if cfg is None:
        _chosen.pop((gpu_name(device), key), None)
    else:
        _chosen[(gpu_name(device), key)] = dict(cfg)
