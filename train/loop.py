"""The fine-tuning run: model, data order, optimiser, train step, evaluation, checkpoints, resume.

Reads top to bottom: `run(cfg, run_dir)` is the whole job; the helpers above it each do one thing.

Reproducibility: the global batch of step s is a pure function of (seed, s) (an epoch-seeded
permutation), the loss is normalised by the global batch's target-token count (not per
micro-batch), and a checkpoint carries the optimiser, scheduler and every RNG state, so
`train.resume=true` after a kill gives the same weights as an uninterrupted run (bitwise on CPU),
and N data-parallel ranks give the same update as one process with the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from models.checkpoint import load_switch, meta_model, replace_dir, save_switch
from models.config import config_from_conf
from models.generate import generate
from models.pregate import convert_to_pregated
from models.switch import Switch
from models.tokenizer import BYTE_TOKENIZER_FILE, ByteTokenizer, load_tokenizer, pad_batch
from train import experts as fast_experts
from train.data import Task, build_task
from train.metrics import score
from train.tracking import Tracker

STATE_FILE = "training_state.pt"


# -- processes and devices ---------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: DictConfig) -> Dist:
    want = cfg.train.device
    cuda = torch.cuda.is_available() if want == "auto" else want == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no GPU is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device("cuda" if cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, torch.device(f"cuda:{local}") if cuda else torch.device("cpu"))


def broadcast(obj: Any, d: Dist) -> Any:
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rng_state(device: torch.device) -> dict[str, Any]:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(s: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


# -- model ----------------------------------------------------------------------------------
def build_model(cfg: DictConfig, d: Dist) -> tuple[Switch, Any, bool]:
    """(model in fp32 on the device, tokenizer, converted_from_checkpoint)."""
    lookahead = int(cfg.model.lookahead)
    if cfg.init.checkpoint:
        model = load_switch(cfg.init.checkpoint, dtype=torch.float32)
        tok = load_tokenizer(cfg.init.checkpoint, vocab_size=model.cfg.vocab_size)
        from_ckpt = True
    else:
        torch.manual_seed(cfg.seed)
        if cfg.train.init_on_device and d.device.type == "cuda":
            # multi-billion-parameter shapes: initialised on the GPU in seconds instead of minutes
            # on the CPU (with the same seed, other initial weights than a CPU init)
            torch.cuda.manual_seed(cfg.seed)
            with torch.device(d.device):
                model = Switch(config_from_conf(cfg.model).replace(pregated=False))
        else:
            model = Switch(config_from_conf(cfg.model).replace(pregated=False))
        tok = ByteTokenizer(model.cfg.vocab_size)
        from_ckpt = False
    converted = False
    if (cfg.pregate.enabled or cfg.model.pregated) and not model.cfg.pregated:
        convert_to_pregated(model, lookahead)
        converted = True
    if cfg.train.trainable == "pregates":
        if not model.cfg.pregated:
            raise ValueError("train.trainable=pregates needs a pre-gated model (pregate.enabled=true)")
        for name, p in model.named_parameters():
            p.requires_grad_(".pregate." in name)
    elif cfg.train.trainable != "all":
        raise ValueError(f"train.trainable={cfg.train.trainable!r}; expected all or pregates")
    model.to(d.device)
    return model, tok, from_ckpt and converted


def make_optimizer(cfg: DictConfig, params: list[torch.nn.Parameter]):
    o = cfg.optim
    if o.name == "adamw":
        # On GPUs the fused kernel: one pass over each tensor, no full-size temporaries (the foreach
        # path allocates a copy of the second moments each step: +4 bytes/parameter at the peak).
        fused = bool(params) and all(p.device.type == "cuda" for p in params)
        opt = torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=fused or None
        )
    elif o.name == "adafactor":
        opt = torch.optim.Adafactor(params, lr=o.lr, beta2_decay=o.beta2_decay, weight_decay=o.weight_decay)
    else:
        raise ValueError(f"optim.name={o.name!r}; expected adamw or adafactor")
    total = max(1, cfg.train.max_steps)

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        t = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        if o.schedule == "linear":
            return 1.0 - (1.0 - o.min_lr_ratio) * t
        if o.schedule == "cosine":
            return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
        raise ValueError(f"optim.schedule={o.schedule!r}; expected constant, linear or cosine")

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def wrap_parallel(model: Switch, cfg: DictConfig, d: Dist) -> torch.nn.Module:
    if d.world == 1:
        return model
    dev_ids = [d.device.index] if d.device.type == "cuda" else None
    if cfg.train.parallel == "ddp":
        # Frozen parameters (the routers of pre-gated blocks) are skipped by DDP; every trainable
        # parameter gets a gradient each step, so no unused-parameter search is needed.
        # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets instead
        # of a second copy (saves 4 bytes per parameter: 30 GB for switch-base-128)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=dev_ids, find_unused_parameters=False, gradient_as_bucket_view=True
        )
        if cfg.train.ddp_grad_dtype == "bf16":
            # gradients all-reduced in bf16 (half the traffic), divided by the world size and written
            # back into the fp32 gradients
            ddp.register_comm_hook(d.world, _bf16_allreduce_hook)
        return ddp
    if cfg.train.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        # FSDP2: parameters become DTensors sharded on dim 0. Units: every MoE FFN (router,
        # pre-gate and expert weights: most of a Switch model's parameters), then the root (the
        # rest). A unit's parameters are all-gathered by its pre-forward hook; an MoE FFN's are
        # freed again after its forward (gathered again for its backward), so only one MoE
        # block's experts are unsharded at a time; the root keeps its own gathered until its
        # backward (or, after an evaluation, reshard()). Gradients are reduce-scattered
        # (averaged, like DDP). Works on CPU with gloo and on GPUs with NCCL; frozen parameters
        # stay frozen. Stack.run calls SparseMLP.gates / .experts rather than forward, so those
        # are registered as forward methods, and their Routing results are made pytrees so that
        # FSDP's pre-backward hooks reach the tensors inside.
        # Per-Block units would need models.switch.Block to have a forward covering all of the
        # block's parameters: Stack.run calls the blocks' sub-modules and methods directly (and
        # Switch.forward reads block 0's position bias and the decoder blocks' cross-attention
        # k/v outside the stacks), so a block's hooks would not fire.
        kw: dict[str, Any] = {}
        if cfg.train.fsdp_param_dtype == "bf16":  # (its values are checked at the start of run)
            if precision(d, cfg) != "bf16":
                raise ValueError(
                    "train.fsdp_param_dtype=bf16 needs bf16 training: set train.precision=bf16 (or auto on a GPU)"
                )
            from torch.distributed.fsdp import MixedPrecisionPolicy

            # gathered (and computed with) in bf16, gradients reduce-scattered in fp32 onto the fp32 shards
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        mesh = init_device_mesh(d.device.type, (d.world,))
        _routing_as_pytree()
        for moe in model.moes:
            fully_shard(moe, mesh=mesh, **kw)
            register_fsdp_forward_method(moe, "gates")
            register_fsdp_forward_method(moe, "experts")
        fully_shard(model, mesh=mesh, **kw)
        # generation (evaluation's ROUGE / EM-F1) calls these instead of forward
        register_fsdp_forward_method(model, "prefill")
        register_fsdp_forward_method(model, "decode_one_token")
        return model
    raise ValueError(f"train.parallel={cfg.train.parallel!r}; expected ddp or fsdp")


def _bf16_allreduce_hook(world, bucket):  # no annotations: DDP checks them against its own types
    """DDP comm hook: the bucket's fp32 gradients divided by the world size, all-reduced in bf16, and
    written back in fp32 (works with NCCL and gloo, unlike torch's bf16_compress_hook)."""
    buf = bucket.buffer()
    half = buf.div(world).to(torch.bfloat16)
    fut = dist.all_reduce(half, async_op=True).get_future()

    def back(f):
        buf.copy_(f.value()[0])
        return buf

    return fut.then(back)


def _routing_as_pytree() -> None:
    """Register models.moe.Routing (a dataclass of tensors) as a pytree node, once per process."""
    import torch.utils._pytree as pytree

    from models.moe import Routing

    if Routing not in pytree.SUPPORTED_NODES:
        pytree.register_dataclass(Routing)


def is_fsdp(wrapped: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(wrapped, FSDPModule)


def model_for_saving(wrapped: torch.nn.Module, model: Switch, d: Dist) -> Switch | None:
    """The model with full parameters to save, on rank 0 (None on other ranks). Under FSDP every
    rank must call this (it all-gathers): the full weights are gathered into CPU memory on rank 0
    only and put into a parameter-less (meta device) skeleton of the model, which the caller drops
    after saving; nothing but the shards is kept between checkpoints."""
    if not is_fsdp(wrapped):
        return model if d.main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return None
    skeleton = meta_model(model.cfg)
    skeleton.load_state_dict(sd, assign=True)
    return skeleton


def param_memory() -> dict[str, int]:
    """This process's parameter memory over every live Switch model: {"models": how many,
    "bytes": bytes of their parameters' storage here (a DTensor's local shard; meta counts 0)}."""
    import gc

    from torch.distributed.tensor import DTensor

    gc.collect()
    models = [o for o in gc.get_objects() if issubclass(type(o), Switch)]  # type(): no __class__ lookups
    storages: dict[int, int] = {}
    for m in models:
        for p in m.parameters():
            t = p.to_local() if isinstance(p, DTensor) else p
            if t.device.type != "meta":
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
    return {"models": len(models), "bytes": sum(storages.values())}


def optimizer_state(wrapped: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser state to save: full (keyed by parameter name) on rank 0 under FSDP."""
    if not is_fsdp(wrapped):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        wrapped, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_optimizer_state(wrapped: torch.nn.Module, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a saved optimiser state: by parameter id (plain / DDP) or by name (saved under FSDP)."""
    by_name = any(isinstance(k, str) for k in sd.get("state", {})) or any(
        isinstance(p, str) for g in sd.get("param_groups", []) for p in g.get("params", [])
    )
    if not is_fsdp(wrapped) and not by_name:
        opt.load_state_dict(sd)
        return
    if is_fsdp(wrapped) and not by_name:
        raise ValueError("resuming under train.parallel=fsdp needs a checkpoint saved under fsdp")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    target = wrapped.module if hasattr(wrapped, "module") and not is_fsdp(wrapped) else wrapped
    set_optimizer_state_dict(target, opt, sd, options=StateDictOptions(full_state_dict=True))


# -- data -------------------------------------------------------------------------------------
@dataclass
class Encoded:
    inputs: list[list[int]]
    targets: list[list[int]]
    texts: list[Any]

    def __len__(self) -> int:
        return len(self.inputs)


def encode(task: Task, split: str, tok, cfg: DictConfig, limit: int = 0, epoch: int = 0) -> Encoded:
    exs = task.examples(split, epoch)
    if limit:
        exs = exs[:limit]
    n_in, n_out = cfg.train.max_input_len, cfg.train.max_target_len  # read once: config access is slow
    return Encoded(
        [tok.encode(e.input, max_length=n_in) for e in exs],
        [tok.encode(e.target, max_length=n_out) for e in exs],
        exs,
    )


class Order:
    """Global batch indices of each step: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, batch: int, seed: int):
        if n == 0:
            raise ValueError("the training split is empty")
        self.n, self.batch, self.seed = n, batch, seed
        self._perm: dict[int, list[int]] = {}

    def perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perm[epoch]

    def slots(self, step: int) -> list[tuple[int, int]]:
        """(epoch, example index) of each sequence of the global batch of `step` (a batch may straddle
        two epochs)."""
        out = []
        for p in range(step * self.batch, (step + 1) * self.batch):
            out.append((p // self.n, self.perm(p // self.n)[p % self.n]))
        return out


class TrainData:
    """The training split as the steps see it: one encoding, or, for a task whose training examples vary
    by epoch (span with data.remask_each_epoch), the encoding of each pass over the data (every epoch has
    the same number of examples). The next epoch's is made in a background thread while this one trains
    (a pure function of the epoch: the same result as making it when asked)."""

    def __init__(self, task: Task, tok, cfg: DictConfig):
        self.task, self.tok, self.cfg = task, tok, cfg
        self.varies = task.varies_by_epoch("train")
        self._enc: dict[int, Encoded] = {0: encode(task, "train", tok, cfg)}
        self._next: tuple[int, Any] | None = None  # (epoch, future) being made ahead
        self._pool = None
        if self.varies:
            self._ahead(1)

    def __len__(self) -> int:
        return len(self._enc[0])

    def _make(self, e: int) -> Encoded:
        return encode(self.task, "train", self.tok, self.cfg, epoch=e)

    def epoch(self, e: int) -> Encoded:
        if not self.varies:
            return self._enc[0]
        if e not in self._enc:
            for k in [k for k in self._enc if k not in (0, e - 1)]:  # keep epoch 0 and the previous one
                del self._enc[k]
            ahead = self._next
            self._enc[e] = ahead[1].result() if ahead is not None and ahead[0] == e else self._make(e)
            if len(self._enc[e]) != len(self):
                raise RuntimeError(f"training epoch {e} has {len(self._enc[e])} examples, epoch 0 {len(self)}")
            self._ahead(e + 1)
        return self._enc[e]

    def _ahead(self, e: int) -> None:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="remask")
        self._next = (e, self._pool.submit(self._make, e))

    def rows(self, slots: list[tuple[int, int]]) -> tuple[list[list[int]], list[list[int]]]:
        """(input ids, target ids) of each (epoch, index) slot."""
        encs = [self.epoch(e) for e, _ in slots]
        return [x.inputs[i] for x, (_, i) in zip(encs, slots)], [x.targets[i] for x, (_, i) in zip(encs, slots)]


def collate(data: Encoded, idx: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    return collate_rows([data.inputs[i] for i in idx], [data.targets[i] for i in idx], device)


def collate_rows(inputs: list[list[int]], targets: list[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    enc = pad_batch(inputs)
    lab = pad_batch(targets, pad_id=-100)["input_ids"]
    return {
        "input_ids": enc["input_ids"].to(device),
        "attention_mask": enc["attention_mask"].to(device),
        "labels": lab.to(device),
    }


def precision(d: Dist, cfg: DictConfig) -> str:
    """train.precision resolved: bf16 (autocast) or fp32."""
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if d.device.type == "cuda" else "fp32"
    if p not in ("bf16", "fp32"):
        raise ValueError(f"train.precision={cfg.train.precision!r}; expected auto, bf16 or fp32")
    return p


def autocast(d: Dist, cfg: DictConfig):
    return torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=precision(d, cfg) == "bf16")


# -- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: Switch, data: Encoded, task: Task, tok, cfg: DictConfig, d: Dist, probe: bool, sharded: bool = False
) -> tuple[dict[str, float], list[list[Any]]]:
    """Loss, token accuracy, task metric, per-block expert loads and (probe) pre-gate agreement.
    Returns (metrics, load rows [stack, block, expert, tokens, fraction]).

    sharded (FSDP): every rank calls this with the sharded model, whose forwards are collective.
    The loss batches are dealt out between the ranks (rank r takes batches r, r + world, ...; a
    rank short of a batch runs a discarded one, so every rank runs as many forwards) and the sums
    are combined; generation runs the same examples on every rank (greedy decoding stops when its
    batch is done, so the ranks must decode the same batches to run the same number of steps).
    Every rank returns the same metrics."""
    was_training = model.training
    model.eval()
    stacks = {"encoder": model.encoder, "decoder": model.decoder}
    for s in stacks.values():
        s.probe_agreement = probe and model.cfg.pregated
    E = model.cfg.num_experts
    loads = {
        (name, m): torch.zeros(E, dtype=torch.long) for name, s in stacks.items() for m in range(len(s.moes))
    }
    agree: dict[tuple[str, int], list[float]] = {}
    loss_sum, n_tok, n_correct = 0.0, 0, 0
    n = len(data) if not cfg.eval.max_examples else min(len(data), cfg.eval.max_examples)
    bs = cfg.eval.batch_size
    devs = [d.device] if d.device.type == "cuda" else []
    starts = list(range(0, n, bs))
    if sharded and d.world > 1:
        per_rank = -(-len(starts) // d.world)
        mine = [starts[j * d.world + d.rank] if j * d.world + d.rank < len(starts) else None for j in range(per_rank)]
    else:
        mine = starts
    with torch.random.fork_rng(devices=devs), autocast(d, cfg):
        for i in mine:
            lo = 0 if i is None else i
            b = collate(data, list(range(lo, min(n, lo + bs))), d.device)
            out = model(**b)
            if i is None:  # only keeps this rank's forwards in step with the others'
                for s in stacks.values():
                    s.agreement = {}
                continue
            mask = b["labels"] != -100
            k = int(mask.sum())
            loss_sum += float(out.lm_loss) * k
            n_tok += k
            n_correct += int(((out.logits.argmax(-1) == b["labels"]) & mask).sum())
            # decoder position t reads label t-1 (shifted right): the real positions are the labelled ones
            dec_mask = mask
            for name, rs, tmask in (
                ("encoder", out.encoder_routings, b["attention_mask"].bool()),
                ("decoder", out.decoder_routings, dec_mask),
            ):
                for m, r in enumerate(rs):
                    ids = r.ids.reshape(tmask.shape)[tmask].long().cpu()
                    loads[(name, m)] += torch.bincount(ids, minlength=E)
            for name, s in stacks.items():
                for m, a in s.agreement.items():
                    agree.setdefault((name, m), []).append(float(a))
                s.agreement = {}
        if sharded and d.world > 1:
            parts: list[Any] = [None] * d.world
            dist.all_gather_object(parts, (loss_sum, n_tok, n_correct, loads, agree))
            loss_sum, n_tok, n_correct = (sum(p[j] for p in parts) for j in range(3))
            loads = {key: sum(p[3][key] for p in parts) for key in loads}
            agree = {}
            for p in parts:
                for key, v in p[4].items():
                    agree.setdefault(key, []).extend(v)
        metrics: dict[str, float] = {
            "loss": loss_sum / max(1, n_tok),
            "token_accuracy": 100.0 * n_correct / max(1, n_tok),
        }
        g = min(n, cfg.eval.generate_examples)
        if g and task.metric != "loss":
            preds, refs = [], []
            for i in range(0, g, bs):
                idx = list(range(i, min(g, i + bs)))
                enc = pad_batch([data.inputs[j] for j in idx])
                ids = generate(
                    model,
                    enc["input_ids"].to(d.device),
                    enc["attention_mask"].to(d.device),
                    max_new_tokens=cfg.eval.max_new_tokens,
                    num_beams=cfg.eval.num_beams,
                )
                preds += tok.batch_decode(ids.tolist())
                refs += [data.texts[j].references for j in idx]
            metrics.update(score(task.metric, preds, refs))
            metrics["_example"] = f"{data.texts[0].input[:200]!r} -> {preds[0]!r} (gold {refs[0][0]!r})"  # type: ignore
    for s in stacks.values():
        s.probe_agreement = False
    rows = []
    for (name, m), c in loads.items():
        tot = max(1, int(c.sum()))
        rows += [[name, m, e, int(c[e]), float(c[e]) / tot] for e in range(E)]
        frac = c.float() / tot
        metrics[f"load_max/{name}{m}"] = float(frac.max())
        metrics[f"load_entropy/{name}{m}"] = float(-(frac * frac.clamp_min(1e-12).log()).sum() / math.log(E))
    for (name, m), v in agree.items():
        metrics[f"agreement/{name}{m}"] = 100.0 * sum(v) / len(v)
    model.train(was_training)
    return metrics, rows


# -- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(
    path: Path, model: Switch, tok, state: dict[str, Any] | None, extra: dict[str, str] | None = None
) -> None:
    """Hugging Face layout + pre-gate keys + tokenizer + (optionally) the training state and `extra` files
    (name -> text), all renamed into place at once: a kill at any point leaves either the old or the new
    checkpoint."""
    extra = dict(extra or {})
    if isinstance(tok, ByteTokenizer):
        extra[BYTE_TOKENIZER_FILE] = json.dumps({"type": "byte", "vocab_size": tok.vocab_size}) + "\n"
    staging = path.with_name(f".{path.name}.staging-{os.getpid()}")
    save_switch(model, staging, extra_files=extra)
    if state is not None:
        torch.save(state, staging / STATE_FILE)
    replace_dir(staging, path)


def find_resumable(path: Path) -> Path | None:
    if (path / STATE_FILE).exists():
        return path
    # killed between the two renames: the previous checkpoint is still whole under its old name
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    return next((p for p in reversed(olds) if (p / STATE_FILE).exists()), None)


# -- the job ----------------------------------------------------------------------------------
class _Stop:
    def __init__(self):
        self.flag = False

    def __call__(self, signum, frame):
        self.flag = True


def run(cfg: DictConfig, run_dir: str | Path, run_name: str | None = None) -> dict[str, Any]:
    """Fine-tune as configured; returns the final metrics (also written to <out_dir>/metrics.json)."""
    d = setup_distributed(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out_dir = Path(cfg.train.out_dir or run_dir)
    out_dir = Path(broadcast(str(out_dir.resolve()), d))
    ckpt_dir = out_dir / "checkpoint"
    best_dir = out_dir / "best"
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)

    if cfg.train.early_stop_evals < 0 or (cfg.train.early_stop_evals and not cfg.train.eval_every):
        raise ValueError(
            f"train.early_stop_evals={cfg.train.early_stop_evals} needs an integer >= 0 and, when > 0, "
            f"validation during the run (train.eval_every={cfg.train.eval_every}: set it > 0)"
        )
    for key in ("fsdp_param_dtype", "ddp_grad_dtype"):
        if cfg.train[key] not in ("fp32", "bf16"):
            raise ValueError(f"train.{key}={cfg.train[key]!r}; expected fp32 or bf16")
    precision(d, cfg)  # a bad train.precision fails here, before the model is built
    if d.world > 1 and cfg.train.parallel == "fsdp" and cfg.optim.name == "adafactor":
        raise ValueError(
            "optim=adafactor does not run under train.parallel=fsdp (torch's Adafactor takes norms of whole "
            "parameters, which FSDP shards); use optim=adamw, or train.parallel=ddp"
        )
    model, tok, from_ckpt = build_model(cfg, d)
    task = build_task(cfg.data)
    train_data = TrainData(task, tok, cfg)
    val_data = encode(task, "validation", tok, cfg)

    B, accum, world = cfg.train.batch_size, cfg.train.grad_accum, d.world
    if B % (world * accum):
        raise ValueError(f"train.batch_size={B} must be divisible by world size {world} x grad_accum {accum}")
    mb = B // (world * accum)
    order = Order(len(train_data), B, cfg.seed)

    step = 0
    resumed_state = None
    if cfg.train.resume:
        src = find_resumable(ckpt_dir)
        if src is not None:
            saved = load_switch(src, dtype=torch.float32)
            model.load_state_dict(saved.state_dict())
            del saved
            resumed_state = torch.load(src / STATE_FILE, map_location="cpu", weights_only=False)
            step = int(resumed_state["step"])
        elif d.main:
            print(f"[train] train.resume=true but {ckpt_dir} holds no training state: starting fresh")

    backend = fast_experts.install(model, cfg.train.expert_backend, d.device)
    params = [p for p in model.parameters() if p.requires_grad]
    full_param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    wrapped = wrap_parallel(model, cfg, d)
    if is_fsdp(wrapped):
        params = [p for p in wrapped.parameters() if p.requires_grad]  # now sharded DTensors
    opt, sched = make_optimizer(cfg, params)
    history: list[dict[str, Any]] = []
    if resumed_state is not None:
        load_optimizer_state(wrapped, opt, resumed_state.pop("optimizer"))  # then dropped: it is full
        sched.load_state_dict(resumed_state["scheduler"])
        set_rng_state(resumed_state["rng"][d.rank], d.device)
        history = resumed_state.get("history", [])
    else:
        torch.manual_seed(cfg.seed + 1 + d.rank)  # jitter noise differs per rank, as in any DP run
        random.seed(cfg.seed + d.rank)
        np.random.seed(cfg.seed + d.rank)

    tracker = None
    mem_after_setup = param_memory() if d.main else None
    if d.main:
        run_config = OmegaConf.to_container(cfg, resolve=True)
        # a resumed run continues the W&B run of the checkpoint (its id is in the training state)
        run_id = resumed_state.get("wandb_run_id") if resumed_state is not None else None
        tracker = Tracker(cfg.logger, run_config, "train", out_dir, name=run_name or out_dir.name, run_id=run_id)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"[train] {model.cfg.num_experts}-expert Switch, {n_params / 1e6:.2f}M params, "
            f"pregated={model.cfg.pregated} lookahead={model.cfg.lookahead}, data={task.name} "
            f"({len(train_data)} train / {len(val_data)} validation), device={d.device} x{world}, "
            f"experts={backend}, out={out_dir}" + (f", resumed at step {step}" if resumed_state else "")
            + (", training examples remasked each epoch" if train_data.varies else "")
        )
    # the lowest validation loss so far and its step (train.keep_best keeps its weights in best_dir)
    best: dict[str, Any] | None = resumed_state.get("best") if resumed_state is not None else None
    # validation evaluations since that minimum (train.early_stop_evals stops the run at this many)
    evals_since_best = int(resumed_state.get("evals_since_best", 0)) if resumed_state is not None else 0
    if resumed_state is None and cfg.train.keep_best and d.main and best_dir.exists():
        import shutil

        print(f"[train] starting fresh: removing the previous run's {best_dir}")
        shutil.rmtree(best_dir)

    def do_eval(split_data: Encoded, prefix: str, at: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        probe = from_ckpt or model.cfg.pregated
        if is_fsdp(wrapped):  # every rank, on the sharded model
            metrics, rows = evaluate(model, split_data, task, tok, cfg, d, probe=probe, sharded=True)
            # The root unit keeps its gathered parameters after a forward (for the backward that
            # follows in training); with no backward they are freed here, back to the shards.
            wrapped.reshard()
        elif d.main:  # the unwrapped module: no collectives
            metrics, rows = evaluate(model, split_data, task, tok, cfg, d, probe=probe)
        if d.main:
            example = metrics.pop("_example", None)
            tracker.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=at)
            tracker.table(
                f"{prefix}/expert_load", ["stack", "block", "expert", "tokens", "fraction"], rows, step=at
            )
            main = {k: round(v, 4) for k, v in metrics.items() if "/" not in k}
            print(f"[train] step {at} {prefix}: {main}" + (f"\n        e.g. {example}" if example else ""))
            history.append({"step": at, "split": prefix, **metrics})
        if d.world > 1:
            dist.barrier()
        return metrics

    def note_validation(metrics: dict[str, float], at: int) -> bool:
        """Track the lowest validation loss (train.keep_best: save its weights to best_dir). True when
        train.early_stop_evals evaluations in a row have not gone below it (every rank agrees: rank 0's
        loss is broadcast)."""
        nonlocal best, evals_since_best
        if at == 0:
            return False
        loss = broadcast(metrics.get("loss") if d.main else None, d)
        if loss is None or not math.isfinite(loss) or (best is not None and loss >= best["validation_loss"]):
            evals_since_best += 1
            patience = cfg.train.early_stop_evals
            return bool(patience) and best is not None and evals_since_best >= patience
        best, evals_since_best = {"step": at, "validation_loss": float(loss)}, 0
        if cfg.train.keep_best:
            full = model_for_saving(wrapped, model, d)
            if d.main:
                save_checkpoint(best_dir, full, tok, None, extra={"best.json": json.dumps(best) + "\n"})
            del full
            if d.world > 1:
                dist.barrier()
        return False

    def checkpoint(at: int, with_state: bool = True) -> None:
        state = None
        if with_state:
            rngs = [rng_state(d.device)]
            if d.world > 1:
                rngs = [None] * d.world
                dist.all_gather_object(rngs, rng_state(d.device))
            opt_sd = optimizer_state(wrapped, opt)
            state = {
                "step": at,
                "optimizer": opt_sd,
                "scheduler": sched.state_dict(),
                "rng": rngs,
                "history": history,
                "samples_seen": at * B,
                "train_tokens": run_tokens,
                "train_seconds": run_train_s,
                "nonfinite_steps": nonfinite_steps,
                "best": best,
                "evals_since_best": evals_since_best,
                "wandb_run_id": tracker.run_id if tracker is not None else None,
                "config": OmegaConf.to_container(cfg),
            }
        full = model_for_saving(wrapped, model, d)
        if d.main:
            save_checkpoint(ckpt_dir, full, tok, state)
        del full
        if d.world > 1:
            dist.barrier()

    stopper = _Stop()
    old_handlers = {signal.SIGTERM: signal.signal(signal.SIGTERM, stopper)}

    if step == 0 and cfg.eval.at_start:
        do_eval(val_data, "validation", 0)

    from tqdm import tqdm

    bar = tqdm(
        total=cfg.train.max_steps,
        initial=step,
        disable=not (cfg.train.progress and d.main),
        dynamic_ncols=True,
        unit="step",
    )
    t_last, tok_count = time.perf_counter(), 0
    no_phase = {"fwd_bwd": 0.0, "optim": 0.0, "steps": 0}
    phase_s = dict(no_phase)  # where the window's step time went (rank 0)
    # Throughput over the whole run, evaluation excluded: training tokens (global batch) per second.
    run_tokens, run_train_s = 0, 0.0
    if resumed_state is not None:  # a resumed run reports the whole run's tokens and seconds
        run_tokens = int(resumed_state.get("train_tokens", 0))
        run_train_s = float(resumed_state.get("train_seconds", 0.0))
    cast = autocast(d, cfg)
    coef_z, coef_aux = model.cfg.router_z_loss_coef, model.cfg.router_aux_loss_coef
    wrapped.train()
    stopped = False
    # resumed after its early stop was due (killed at that very evaluation): no further steps
    early_stopped = bool(cfg.train.early_stop_evals) and best is not None and (
        evals_since_best >= cfg.train.early_stop_evals
    )
    last_val: tuple[int, dict[str, float]] | None = None  # the latest in-loop validation (step, metrics)
    nonfinite_steps = int(resumed_state.get("nonfinite_steps", 0)) if resumed_state is not None else 0
    nonfinite_run = 0
    while step < cfg.train.max_steps and not early_stopped:
        inputs, targets = train_data.rows(order.slots(step))
        n_target = sum(len(t) for t in targets)
        tok_count += n_target + sum(len(x) for x in inputs)
        run_tokens += n_target + sum(len(x) for x in inputs)
        t_step = time.perf_counter()
        logged = {"lm": 0.0, "z": 0.0, "aux": 0.0}
        for a in range(accum):
            lo = (a * world + d.rank) * mb
            b = collate_rows(inputs[lo : lo + mb], targets[lo : lo + mb], d.device)
            k = int((b["labels"] != -100).sum())
            sync = a == accum - 1 or d.world == 1 or not hasattr(wrapped, "no_sync")
            with nullcontext() if sync else wrapped.no_sync(), cast:
                out = wrapped(**b)
                # sums over the global batch (then x world: DDP averages gradients over ranks)
                loss = (
                    out.lm_loss * (k / n_target) + (coef_z * out.z_loss + coef_aux * out.aux_loss) * (mb / B)
                ) * world
            loss.backward()
            logged["lm"] += float(out.lm_loss.detach()) * k / n_target
            logged["z"] += float(out.z_loss.detach()) * mb / B
            logged["aux"] += float(out.aux_loss.detach()) * mb / B
        # float() above waited for the device: forward, backward and (DDP) the gradients' all-reduce are done
        t_fb = time.perf_counter()
        if step == cfg.train.nan_at_step:
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        # The global gradient norm (over ranks: DDP gradients are all-reduced, FSDP's clip reduces);
        # clipping with max_norm=inf measures without changing anything. A non-finite loss on any rank
        # makes it non-finite on every rank, so all ranks skip the same steps with no extra collective.
        max_norm = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else float("inf")
        if hasattr(wrapped, "clip_grad_norm_"):
            gnorm = wrapped.clip_grad_norm_(max_norm)
        else:
            gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if math.isfinite(float(gnorm)):
            opt.step()
            nonfinite_run = 0
        else:
            nonfinite_steps += 1
            nonfinite_run += 1
            if d.main:
                print(f"[train] step {step + 1}: non-finite loss or gradient norm (loss {logged['lm']}, grad norm "
                      f"{float(gnorm)}): update skipped ({nonfinite_steps} so far)", flush=True)
            if nonfinite_run > cfg.train.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{nonfinite_run} optimizer steps in a row had a non-finite loss or gradient norm (last at "
                    f"step {step + 1}); stopping. The weights are the last finite ones (the last saved "
                    f"checkpoint is in {ckpt_dir}). Lower optim.lr, raise optim.warmup_steps, use "
                    f"train.precision=fp32, or raise train.max_nonfinite_steps to tolerate more."
                )
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        t_end = time.perf_counter()
        run_train_s += t_end - t_step
        phase_s["fwd_bwd"] += t_fb - t_step
        phase_s["optim"] += t_end - t_fb
        phase_s["steps"] += 1

        log_now = step % max(1, cfg.train.log_every) == 0 or step == cfg.train.max_steps
        if log_now and d.world > 1:
            # each rank holds its share of the global batch's losses: their sum is the global value
            t = torch.tensor([logged["lm"], logged["z"], logged["aux"]], dtype=torch.float64, device=d.device)
            dist.all_reduce(t)
            logged = dict(zip(("lm", "z", "aux"), t.tolist()))
        if d.main:
            now = time.perf_counter()
            bar.update(1)
            if log_now:
                tps = tok_count / (now - t_last)  # tok_count counts the global batch
                bar.set_postfix(loss=f"{logged['lm']:.4f}", tok_s=f"{tps:,.0f}")
                tracker.log(
                    {
                        "train/loss": logged["lm"],
                        "train/z_loss": logged["z"],
                        "train/aux_loss": logged["aux"],
                        "train/grad_norm": float(gnorm),
                        "train/lr": sched.get_last_lr()[0],
                        "train/tokens_per_s": tps,
                    },
                    step=step,
                )
                t_last, tok_count = now, 0
                # the training curve, also without W&B: in metrics.json's history (split "train")
                # per step, mean over the window: forward + backward (with DDP's all-reduce; FSDP's gathers)
                # and clip + optimizer step + zero_grad (FSDP: its norm's reduction), in seconds
                ns = max(1, phase_s["steps"])
                history.append({"step": step, "split": "train", "loss": logged["lm"], "z_loss": logged["z"],
                                "aux_loss": logged["aux"], "grad_norm": float(gnorm),
                                "lr": sched.get_last_lr()[0], "tokens_per_s": tps,
                                "fwd_bwd_s": phase_s["fwd_bwd"] / ns, "optim_s": phase_s["optim"] / ns})
                phase_s = dict(no_phase)
                if not cfg.train.progress:
                    print(f"[train] step {step} train: loss {logged['lm']:.4f}, grad norm {float(gnorm):.3g}, "
                          f"lr {sched.get_last_lr()[0]:.3g}, {tps:,.0f} tok/s", flush=True)
        stop = stopper.flag
        if d.world > 1:
            f = torch.tensor([float(stop)], device=d.device)
            dist.all_reduce(f)
            stop = bool(f.item())
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            last_val = (step, do_eval(val_data, "validation", step))
            early_stopped = note_validation(last_val[1], step)
            wrapped.train()
            if early_stopped and not stop:
                if d.main:
                    print(
                        f"[train] early stop at step {step}: validation loss has not gone below "
                        f"{best['validation_loss']:.4f} (step {best['step']}) for {evals_since_best} evaluations"
                    )
                break
        if stop or (
            cfg.train.stop_after_steps and step == cfg.train.stop_after_steps and step < cfg.train.max_steps
        ):
            checkpoint(step)
            if d.main:
                print(
                    f"[train] stopped at step {step}; checkpoint with training state in {ckpt_dir} "
                    "(continue with train.resume=true)"
                )
            stopped = True
            break
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
            checkpoint(step)
    bar.close()
    for s, h in old_handlers.items():
        signal.signal(s, h)

    result: dict[str, Any] = {
        "step": step, "stopped": stopped, "checkpoint": str(ckpt_dir), "world_size": d.world,
        "train_tokens": run_tokens, "train_seconds": run_train_s,
        "train_tokens_per_s": run_tokens / run_train_s if run_train_s > 0 else None,
        "nonfinite_steps": nonfinite_steps,
        "early_stopped": early_stopped and not stopped,
    }
    if not stopped:
        if early_stopped and last_val is not None and last_val[0] == step:
            final_val = last_val[1]  # evaluated at this step already
        else:
            final_val = do_eval(val_data, "validation", step)
            note_validation(final_val, step)
        result["validation"] = final_val
        if cfg.eval.test:
            test_data = encode(task, "test", tok, cfg)
            result["test"] = do_eval(test_data, "test", step)
        if cfg.train.save_at_end:
            checkpoint(step)
        if d.main:
            first = next((h for h in history if h["split"] == "validation"), None)
            if first is not None:
                result["validation_loss_start"] = first["loss"]
            result["validation_loss_end"] = final_val.get("loss")
            if best is not None:
                result["best"] = {**best, "checkpoint": str(best_dir) if cfg.train.keep_best else None}
            if cfg.train.save_at_end:
                tracker.artifact(f"checkpoint-{out_dir.name}", "model", ckpt_dir)
                print(
                    f"[train] done: {step} steps; checkpoint (Hugging Face layout + pre-gates + training state) "
                    f"in {ckpt_dir}"
                )
            else:
                print(f"[train] done: {step} steps; no final checkpoint (train.save_at_end=false)")
    if d.main:
        # parameter memory of rank 0 (all live models; under FSDP only the local shards)
        result["param_memory"] = {
            "full_bytes": full_param_bytes, "after_setup": mem_after_setup, "at_end": param_memory(),
            "fsdp_units": sum(is_fsdp(m) for m in model.modules()),
        }
        if d.device.type == "cuda":  # rank 0's peak over the run (training, evaluation, checkpoints)
            result["cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
            result["cuda_peak_reserved_gib"] = torch.cuda.max_memory_reserved(d.device) / 2**30
        result["history"] = history
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        tracker.finish()
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result
