"""Structured config of `python -m train`: conf/train.yaml and its groups are checked against these
dataclasses when the app starts, so a misspelt key or a wrong type fails naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from models.config import ModelConf
from train.data import DataConf
from train.tracking import LoggerConf


@dataclass
class InitConf:
    # A Hugging Face Switch checkpoint directory (or one written by this app); null: random init.
    checkpoint: str | None = None


@dataclass
class PregateConf:
    # Convert to pre-gated before fine-tuning (lookahead: model.lookahead). false: fine-tune as is.
    enabled: bool = True


@dataclass
class OptimConf:
    name: str = "adamw"  # adamw | adafactor
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8  # adamw
    beta2_decay: float = -0.8  # adafactor
    schedule: str = "constant"  # constant | linear | cosine (after warm-up)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # decay schedules end at lr * min_lr_ratio
    clip_grad_norm: float = 1.0  # 0: no clipping


@dataclass
class TrainConf:
    max_steps: int = 200
    batch_size: int = 8  # global: sequences per optimizer step, over all ranks and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step
    trainable: str = "all"  # all (the paper) | pregates
    max_input_len: int = 192  # tokens (longer inputs are cut)
    max_target_len: int = 96
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    expert_backend: str = "auto"  # auto (grouped GEMM on a capable GPU) | grouped | reference
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard; under torchrun)
    # FSDP: the dtype in which parameters are all-gathered and computed with (bf16 halves the gather
    # traffic and the unsharded memory; gradients are still reduced and kept in fp32). bf16 needs
    # precision bf16 (or auto on a GPU).
    fsdp_param_dtype: str = "fp32"  # fp32 | bf16
    # DDP: the dtype of the gradient all-reduce (bf16 halves the traffic; the sum is rounded to bf16)
    ddp_grad_dtype: str = "fp32"  # fp32 | bf16
    # random init directly on the GPU (seconds instead of minutes for multi-billion-parameter shapes;
    # with the same seed, other initial weights than the default CPU init)
    init_on_device: bool = False
    save_at_end: bool = True  # false: no final checkpoint (throughput benchmarks); metrics.json is kept
    eval_every: int = 100  # 0: only at the start and the end
    save_every: int = 0  # 0: only at the end
    # also keep the weights of the lowest validation loss so far in <out_dir>/best (Hugging Face layout,
    # no training state; best.json says the step and loss), checked at every validation evaluation
    keep_best: bool = False
    # stop when this many validation evaluations in a row have not gone below the lowest validation loss
    # so far (0: off); the run then ends as at max_steps (final evaluation, test, checkpoint)
    early_stop_evals: int = 0
    log_every: int = 10
    resume: bool = False  # continue from <out_dir>/checkpoint when it holds a training state
    stop_after_steps: int = 0  # debug: save and exit after this many steps, as if killed
    # A step whose loss or gradient norm is not finite is skipped (no update; counted in metrics.json as
    # nonfinite_steps); this many in a row stop the run with an error (the weights stay the last finite).
    max_nonfinite_steps: int = 10
    nan_at_step: int = -1  # debug: make this step's gradients NaN (tests the guard above)
    out_dir: str | None = None  # default: the Hydra run dir; the checkpoint is <out_dir>/checkpoint
    progress: bool = True
    threads: int = 0  # torch CPU threads; 0: torch's default


@dataclass
class EvalConf:
    batch_size: int = 32
    max_examples: int = 0  # validation examples for loss/accuracy/loads; 0: all
    generate_examples: int = 32  # examples decoded for ROUGE / EM-F1; 0: none
    max_new_tokens: int = 64
    num_beams: int = 1
    at_start: bool = True
    test: bool = True  # evaluate on test at the end


@dataclass
class AppConf:
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    optim: OptimConf = field(default_factory=OptimConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    init: InitConf = field(default_factory=InitConf)
    pregate: PregateConf = field(default_factory=PregateConf)
    train: TrainConf = field(default_factory=TrainConf)
    eval: EvalConf = field(default_factory=EvalConf)
    seed: int = 0
    # free-form, for experiment configs (e.g. sweeps' notes); never read by the app
    tags: dict[str, Any] = field(default_factory=dict)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=AppConf)
