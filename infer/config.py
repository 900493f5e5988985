"""Structured config of `python -m infer` (conf/infer.yaml is checked against it: a misspelt key or
a wrong type fails at start). No Hydra import at module level: scripts use the runner without it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.config import ModelConf
from train.data import DataConf
from train.tracking import LoggerConf


@dataclass
class PolicyConf:
    name: str = "compare"  # a policy, or `compare`: every name in `names`
    names: list[str] = field(default_factory=list)


@dataclass
class CacheConf:
    # cache slots per MoE block: an int (0: no cache) or "auto": as many as the GPU memory left after
    # loading allows (budget_gb, or the free memory minus reserve_gb), at most the number of experts
    size: Any = 0
    kind: str = "lru"  # lru | lfu
    budget_gb: float | None = None  # size=auto: GPU memory the caches may take; null: free - reserve_gb
    reserve_gb: float = 4.0  # size=auto without budget_gb: kept free (activations, graphs, slot pools)


@dataclass
class OffloadConf:
    pinned_budget_gb: float | None = None  # null: 3/4 of the machine's RAM
    copy_mode: str = "auto"  # auto (dma on a GPU where its native loop builds, else device) | device (GPU-driven
    # gather) | dma (copy engines, started by a host loop) | host
    cpu_compute: str = "off"  # off | auto (cost model) | always: missed experts computed on the CPU
    link_GBps: float | None = None  # cost model's copy bandwidth; null: one expert's copy, measured
    cpu_overhead_ms: float | None = None  # cost model's host round trip per block; null: measured
    prefill_slots: int = 16  # slots the encoder pass streams its experts through (two buffers of half)
    # pregated/lookahead: guess the first decoder MoE block's experts from each step's tokens: keep (the
    # engine keeps the guess table across runs) | run (a new table each run) | off
    first_block_guess: str = "keep"
    # none | int8: experts stored, copied and computed as symmetric per-row int8 (half of bf16's bytes
    # to copy; every policy, gpu_only included, then computes from the same int8 weights)
    quantize: str = "none"
    # auto | none | exp4 | expv: bf16 experts stored and copied packed losslessly (exp4: about 76% of the bytes;
    # expv, a variable-length exponent code: about 67%), unpacked on the GPU into the slots (bitwise the same
    # weights; copy_mode device or dma). auto where it applies (CUDA, bf16 experts, no quantize, cpu_compute off,
    # copy_mode not host): expv for experts of at least expv_min_mib MiB in bf16, exp4 below (an expert that does
    # not pack: the next of expv, exp4, none); else none
    compress: str = "auto"
    expv_min_mib: float = 16.0
    # the device copy kernel (copy_mode device): normal | high stream priority for the copy stream,
    # programs per copied expert, elements per program and iteration (infer.offload.CopySettings)
    copy_priority: str = "normal"
    copy_programs: int = 32
    copy_block: int = 8192
    copy_warps: int = 4
    # copy_mode dma's host loop: a C thread calling the CUDA driver (native), a Python thread calling it (driver),
    # or a Python thread with torch's copy_ (torch)
    dma_api: str = "native"


@dataclass
class DefaultModelConf:
    dir: str = "checkpoints/default"  # used when checkpoint is null; built by training when missing
    train_steps: int = 200  # steps of `python -m train` when it has to be built
    train_timeout_s: int = 240
    train_overrides: list[str] = field(default_factory=list)  # extra `python -m train` overrides


@dataclass
class InferConf:
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    policy: PolicyConf = field(default_factory=PolicyConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    checkpoint: str | None = None
    policies: list[str] | None = None  # overrides `policy`: compared in one run
    cache: CacheConf = field(default_factory=CacheConf)
    offload: OffloadConf = field(default_factory=OffloadConf)
    default_model: DefaultModelConf = field(default_factory=DefaultModelConf)
    split: str = "test"
    num_examples: int = 48  # 0: the whole split
    batch_size: int = 8
    num_beams: int = 1
    max_input_tokens: int = 256
    max_new_tokens: int = 64
    device: str = "auto"  # auto | cpu | cuda[:i]
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    cuda_graph: bool = True
    measure_stall: bool = True  # CUDA events around each wait (eager); graph steps: by difference
    warmup: bool = True  # one untimed short pass per policy (allocator, kernels, caches)
    threads: int = 0  # torch CPU threads; 0: 1 on the CPU (small models), torch's default on CUDA
    seed: int = 0


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="infer_schema", node=InferConf)
