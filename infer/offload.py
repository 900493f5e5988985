"""Expert offloading: the expert store in (pinned) CPU memory, the GPU slot pool, and the copier.

Legend: M MoE blocks (encoder's, then decoder's), E experts per block, F expert hidden width,
D model width, X = 2*F*D elements of one expert (w_in then w_out, one contiguous chunk),
P slots in the pool, C cache slots per block, R staging buffers in the ring, n slots per
staging buffer, K = C + n candidate slots of one block.

Every placement decision is made with tensor operations on the compute device from the routing
ids (no host synchronisation), so the decode step stays capturable as a CUDA graph; only the
"host" copy mode (cudaMemcpyAsync per expert) reads the plan on the host. On a CPU-only machine
the store is ordinary memory, the "slots" are CPU tensors and copies are synchronous, but the same
slot/table/cache logic runs, so the equality tests exercise it.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from infer import native_copier
from kernels import expert_copy, expert_pack, expert_vlc, mailbox
from kernels.expert_ffn import Int8Weights, quantize_experts
from models.config import SwitchConfig

GB = 1e9
DMA_APIS = ("native", "driver", "torch")
# offload.compress=auto packs experts of at least this many bytes (bf16) with expv, smaller ones with exp4
EXPV_MIN_BYTES = 16 * 2**20


class OffloadError(ValueError):
    """An offload setting that cannot work (memory budget, model kind); the message names the fix."""


# ----------------------------------------------------------------------------------------------- store
class PackFailed(OffloadError):
    """offload.compress (exp4, expv) could not pack an expert losslessly within its layout (too many exceptions, or
    for expv more exponent code bits than its stream holds)."""


class ExpertStore:
    """Every MoE block's experts in CPU memory, one contiguous chunk per expert: data [M, E, X].

    On CUDA the chunk is page-locked with cudaHostRegister (exact size; torch's pinned allocator
    would round up to a power of two) and mapped, so a kernel can also read it in place.

    quantize="int8": each chunk is w_in then w_out as symmetric per-row int8, then their fp32 row
    scales (F, then D of them), as bytes: data int8 [M, E, 2*F*D + 4*(F + D)], about half of bf16's
    bytes to copy per expert. The experts are then computed from the int8 weights (Int8Weights), in
    every policy and in gpu_only alike; the model computes in `dtype` either way.

    compress="exp4" (bf16 only): each chunk is the expert's bf16 row (w_in then w_out) packed losslessly
    (kernels.expert_pack: sign and mantissa in a byte, the exponent as 4 bits against a base per 128
    weights, the rare rest as exceptions): data uint8 [M, E, layout.nbytes], about 76% of bf16's bytes to
    copy. The pool's slots hold the unpacked bf16 rows, bitwise the weights gpu_only computes with, so
    every policy gives the same outputs as without compression.

    compress="expv" (bf16 only): as exp4 with the exponent codes in a variable-length code (kernels.expert_vlc:
    2 bits for the three commonest, more for the rarer), about 67% of bf16's bytes to copy: each chunk's codes fill
    a prefix of it, and a copy moves the longest prefix over the store (expert_bytes, known once every block is
    packed); the chunks are as large as exp4's in host memory. Its unpack reads the packed row by gathers, so the
    pool lands every copy in GPU memory first (SlotPool.landing) and unpacks it there.
    """

    CODECS = {"exp4": expert_pack, "expv": expert_vlc}

    def __init__(
        self, cfg: SwitchConfig, num_blocks: int, dtype: torch.dtype, budget_bytes: float | None, pin: bool,
        quantize: str | None = None, compress: str | None = None,
    ):
        self.check_settings(dtype, quantize, compress)
        self.M, self.E, self.F, self.D = num_blocks, cfg.num_experts, cfg.d_ff, cfg.d_model
        if quantize and (self.F * self.D) % 2:
            raise OffloadError(f"offload.quantize=int8 needs d_ff * d_model even (4-byte aligned row scales); "
                               f"got {self.F} x {self.D}")
        self.quantize = quantize
        self.compress = compress
        FD = self.F * self.D
        self.codec = self.CODECS[compress] if compress else None
        self.layout = self.codec.layout(2 * FD) if compress else None
        # expv's unpack reads its chunks by gathers, which suit GPU memory and not the link: its copies land in GPU
        # memory first (exp4's kernel unpacks the pinned chunks in place as it reads them)
        self.lands_first = compress == "expv"
        if compress:
            self.X = self.layout.nbytes  # bytes of a packed chunk
            self.dtype = torch.uint8
        else:
            self.X = 2 * FD + (4 * (self.F + self.D) if quantize else 0)  # elements of data's dtype per expert
            self.dtype = torch.int8 if quantize else dtype
        # a GPU slot's row: the chunk as copied, or (compressed) the unpacked bf16 row
        self.slot_X, self.slot_dtype = (2 * FD, dtype) if compress else (self.X, self.dtype)
        self.row_bytes = self.X * torch.empty((), dtype=self.dtype).element_size()  # a chunk in host memory
        # copied per expert, each chunk's first expert_bytes: the whole chunk, or (expv) the longest packed prefix, 0
        # until a block is packed
        self.expert_bytes = 0 if compress == "expv" else self.row_bytes
        self.slot_bytes = self.slot_X * torch.empty((), dtype=self.slot_dtype).element_size()  # a GPU slot's row
        self.total_bytes = self.M * self.E * self.row_bytes
        if budget_bytes is not None and self.total_bytes > budget_bytes:
            how = ("int8 + row scales" if quantize else f"bf16 packed by {compress}" if compress
                   else str(dtype).replace("torch.", ""))
            raise OffloadError(
                f"the experts need {self.total_bytes / GB:.2f} GB of pinned CPU memory "
                f"({self.M} MoE blocks x {self.E} experts x {self.row_bytes / 1e6:.2f} MB "
                f"in {how}), "
                f"over the budget of {budget_bytes / GB:.2f} GB; raise it with offload.pinned_budget_gb=<GB> "
                f"(this machine has {_ram_bytes() / GB:.0f} GB of RAM)"
            )
        self.data = torch.empty((self.M, self.E, self.X), dtype=self.dtype)  # [M, E, X]
        self.pinned = False
        if pin:
            self._pin()

    @staticmethod
    def check_settings(dtype: torch.dtype, quantize: str | None, compress: str | None) -> None:
        """Raise OffloadError, naming the fix, for a quantize / compress setting that cannot hold these experts."""
        if quantize not in (None, "int8"):
            raise OffloadError(f"offload.quantize={quantize!r}; expected none or int8")
        if compress not in (None, "exp4", "expv"):
            raise OffloadError(f"offload.compress={compress!r}; expected none, exp4, expv or auto")
        if compress and quantize:
            raise OffloadError(f"offload.compress={compress} packs bf16 experts losslessly; it does not apply to "
                               "offload.quantize=int8: set one of them to none")
        if compress and dtype != torch.bfloat16:
            raise OffloadError(f"offload.compress={compress} packs bf16 weights; the experts here are "
                               f"{str(dtype).replace('torch.', '')}: run in bf16 (dtype=bfloat16) or set "
                               "offload.compress=none")

    @staticmethod
    def resolve_compress(setting: str | None, device, dtype: torch.dtype, quantize: str | None = None,
                         cpu_compute: str = "off", copy_mode: str = "auto", expert_bytes: int | None = None,
                         expv_min_bytes: float = EXPV_MIN_BYTES) -> tuple[str | None, str]:
        """offload.compress as the store takes it (None, "exp4" or "expv"), and why. `auto` packs where the experts
        cross a link to a GPU and the packing applies: CUDA, bf16 experts, no quantize, no CPU compute, a copy mode
        that unpacks on the GPU (device, dma, auto); elsewhere (the CPU, fp32, int8) it is none. Where it packs:
        expv for experts of at least expv_min_bytes in bf16 (expert_bytes; offload.expv_min_mib), exp4 below (and
        where expert_bytes is not given). expv copies about 67% of bf16's bytes against exp4's 76%, but its unpack
        (about 4 us per MB of packed expert on the H200, against exp4's 1) runs on the compute stream: it pays where a
        block's compute and that unpack stay under the expert's copy. On the H200 that held for switch-large-128's
        16.8 MB experts (1.06x the copy floor, 1.82x on_demand; exp4: 1.04x, 1.67x) and not for switch-base-128's
        9.4 MB ones (1.18x its lower floor; exp4: 1.08x): bench/results/e2e-h200-expv.md. An explicit value is
        taken as is (check_settings then names what does not fit)."""
        s = "none" if setting is None else str(setting)
        if s == "none":
            return None, "offload.compress=none"
        if s != "auto":
            return s, f"offload.compress={s}"
        why = ("the experts are not copied to a GPU" if torch.device(device).type != "cuda"
               else f"the experts are {str(dtype).replace('torch.', '')}, not bfloat16" if dtype != torch.bfloat16
               else "offload.quantize=int8" if quantize
               else f"offload.cpu_compute={cpu_compute}" if cpu_compute != "off"
               else "offload.copy_mode=host" if copy_mode == "host"
               else None)
        if why:
            return None, f"offload.compress=auto: none ({why})"
        if expert_bytes is not None and expert_bytes >= expv_min_bytes:
            return "expv", (f"offload.compress=auto: expv (bf16 experts of {expert_bytes / 2**20:.1f} MiB, at least "
                            f"offload.expv_min_mib={expv_min_bytes / 2**20:g}, copied to the GPU packed losslessly)")
        return "exp4", ("offload.compress=auto: exp4 (bf16 experts"
                        + (f" of {expert_bytes / 2**20:.1f} MiB" if expert_bytes is not None else "")
                        + " copied to the GPU packed losslessly)")

    def _pin(self) -> None:
        ptr, size = self.data.data_ptr(), self.total_bytes
        rc = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 3))  # portable | mapped
        if rc != 0:
            raise OffloadError(
                f"cudaHostRegister of {size / GB:.2f} GB failed (cudaError {rc}); "
                "lower offload.pinned_budget_gb or free host memory"
            )
        self.pinned = True

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self.pinned = False

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # views of one expert (and of many: `rows` is [..., X], an expert's chunk per row)
    def w_in(self, m: int, e: int) -> torch.Tensor | Int8Weights:
        return self.weights(self.chunk(m, e))[0]  # [F, D]

    def w_out(self, m: int, e: int) -> torch.Tensor | Int8Weights:
        return self.weights(self.chunk(m, e))[1]  # [D, F]

    def chunk(self, m: int, e: int) -> torch.Tensor:
        """Expert e of block m as a slot row: a view of its chunk, or (compressed) its unpacked bf16 row, a copy
        (writing into it does not change the store: fill a compressed store with pack_block)."""
        if self.compress:
            return self.codec.unpack_rows_reference(self.data[m, e : e + 1], self.layout)[0]
        return self.data[m, e]

    def unpacked_block(self, m: int, device=None) -> torch.Tensor:
        """Block m's experts as slot rows [E, slot_X] on `device` (compressed: unpacked there)."""
        if not self.compress:
            return self.data[m].to(device) if device is not None else self.data[m]
        device = torch.device(device) if device is not None else self.data.device
        if device.type == "cuda":
            out = torch.empty((self.E, self.slot_X), dtype=self.slot_dtype, device=device)
            ids = torch.arange(self.E, dtype=torch.int32, device=device)
            if not self.lands_first:  # the kernel reads the pinned chunks in place (no packed copy on the device)
                src = self.data[m] if self.pinned else self.data[m].to(device)
                return expert_pack.unpack_rows(src, ids, out, self.layout, num_programs=128)
            for e in range(self.E):  # a chunk at a time on the device: no block of packed rows beside gpu_only's
                expert_vlc.unpack_rows(self.data[m, e:e + 1].to(device), ids[:1], out[e:e + 1], self.layout)
            return out
        return self.codec.unpack_rows_reference(self.data[m], self.layout).to(device)

    def pack_block(self, m: int, rows: torch.Tensor, device=None, slice_bytes: float = 256e6) -> None:
        """Fill block m of a compressed store from its experts' bf16 rows [E, 2*F*D] (w_in then w_out, on any
        device). Packed on `device` (default: the rows' own), a slice of about slice_bytes of rows at a time, then
        copied in: on a GPU a switch-base expert packs in ~0.2 ms, on 2 CPU cores in ~56 ms."""
        if rows.shape != (self.E, self.slot_X) or rows.dtype != torch.bfloat16:
            raise OffloadError(f"pack_block: block {m} needs bf16 rows [{self.E}, {self.slot_X}]; got "
                               f"{rows.dtype} {tuple(rows.shape)}")
        device = rows.device if device is None else torch.device(device)
        n = max(1, min(self.E, int(slice_bytes // self.slot_bytes)))
        for i in range(0, self.E, n):
            try:
                packed = self.codec.pack_rows(rows[i:i + n].to(device, non_blocking=True), self.layout)
            except expert_pack.PackError as e:
                other = "offload.compress=exp4 or none" if self.compress == "expv" else "offload.compress=none"
                raise PackFailed(f"offload.compress={self.compress}: MoE block {m}: {e}; {other} stores these "
                                 "experts") from None
            if self.compress == "expv":
                packed, used = packed
                self.expert_bytes = max(self.expert_bytes, int(used.max()))
            self.data[m, i:i + n].copy_(packed)

    def put_block(self, m: int, rows: torch.Tensor) -> None:
        """Block m from its experts' slot rows [E, slot_X] (any device): packed (pack_block) or copied."""
        if self.compress:
            self.pack_block(m, rows)
        else:
            self.data[m].copy_(rows)

    def weights(self, rows: torch.Tensor):
        """(w_in [..., F, D], w_out [..., D, F]) as views of slot rows [..., slot_X]: tensors, or Int8Weights
        (q, fp32 scale) with quantize="int8". (A compressed store's own chunks are packed bytes: its slot rows
        come from chunk() / unpacked_block().)"""
        if self.compress and rows.dtype != self.slot_dtype:
            raise OffloadError("ExpertStore.weights: a compressed store's chunks are packed; unpack them first "
                               "(chunk(), unpacked_block())")
        F, D, FD = self.F, self.D, self.F * self.D
        lead = rows.shape[:-1]
        w_in = rows[..., :FD].view(*lead, F, D)
        w_out = rows[..., FD : 2 * FD].view(*lead, D, F)
        if not self.quantize:
            return w_in, w_out
        s_in = rows[..., 2 * FD : 2 * FD + 4 * F].view(torch.float32)  # [..., F]
        s_out = rows[..., 2 * FD + 4 * F :].view(torch.float32)  # [..., D]
        return Int8Weights(w_in, s_in), Int8Weights(w_out, s_out)

    @staticmethod
    def put(dst: torch.Tensor | Int8Weights, w: torch.Tensor) -> None:
        """Write float weights w into a view from weights() (quantizing per row when it is Int8Weights)."""
        if isinstance(dst, Int8Weights):
            q = quantize_experts(w)
            dst.q.copy_(q.q)
            dst.scale.copy_(q.scale)
        else:
            dst.copy_(w.detach())

    # filling
    @classmethod
    def from_checkpoint(
        cls, path: str | Path, model, dtype: torch.dtype, budget_bytes: float | None, pin: bool,
        quantize: str | None = None, compress: str | None = None, pack_device=None,
    ) -> ExpertStore:
        """Read every expert straight from the checkpoint files (memory-mapped) into its chunk (compressed: a
        block at a time into bf16 rows, then packed on pack_device, default the CPU; PackFailed when a row does
        not pack)."""
        from models.checkpoint import CheckpointReader, key_map

        names = _moe_names(model)
        store = cls(model.cfg, len(names), dtype, budget_bytes, pin, quantize, compress)
        reader = CheckpointReader(path)
        where = {name: m for m, name in enumerate(names)}
        by_block: dict[int, list[tuple[str, str, int]]] = {}
        for key, (own, e) in key_map(model.cfg, model).items():
            if e is None:
                continue
            mod, leaf = own.rsplit(".", 1)
            by_block.setdefault(where[mod], []).append((key, leaf, e))
        for m, keys in sorted(by_block.items()):
            rows = torch.empty((store.E, store.slot_X), dtype=store.slot_dtype) if compress else store.data[m]
            for key, leaf, e in keys:
                store.put(store.weights(rows[e])[0 if leaf == "w_in" else 1], reader.get(key))
            if compress:
                store.pack_block(m, rows, pack_device)
        return store

    @classmethod
    def from_model(
        cls, model, dtype: torch.dtype | None = None, budget_bytes: float | None = None, pin: bool = False,
        quantize: str | None = None, compress: str | None = None,
    ) -> ExpertStore:
        """Copy a materialised model's experts (tests, random benchmark models)."""
        moes = model.moes
        store = cls(model.cfg, len(moes), dtype or moes[0].w_in.dtype, budget_bytes, pin, quantize, compress)
        for m, moe in enumerate(moes):
            rows = (torch.empty((store.E, store.slot_X), dtype=store.slot_dtype, device=moe.w_in.device)
                    if compress else store.data[m])
            w_in, w_out = store.weights(rows)
            store.put(w_in, moe.w_in)
            store.put(w_out, moe.w_out)
            if compress:
                store.pack_block(m, rows)
        return store


def _moe_names(model) -> list[str]:
    """Module names of model.moes, in the same order (encoder's blocks, then decoder's)."""
    by_id = {id(mod): name for name, mod in model.named_modules()}
    return [by_id[id(m)] for m in model.moes]


def _ram_bytes() -> int:
    try:
        return os_sysconf("SC_PAGE_SIZE") * os_sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 0


def os_sysconf(name: str) -> int:
    import os

    return os.sysconf(name)


def default_budget_bytes() -> float:
    """Three quarters of the machine's RAM."""
    return 0.75 * _ram_bytes()


def is_expert_param(name: str) -> bool:
    return name.endswith(".ff.w_in") or name.endswith(".ff.w_out")


@dataclass(frozen=True)
class CopySettings:
    """How the device copy kernel moves experts (offload.copy_priority / _programs / _block / _warps).

    priority: "normal", or "high": the copy stream at the device's highest stream priority, so that
    the copy kernel's blocks are scheduled ahead of the compute kernels waiting for free SMs (a
    captured graph keeps each kernel node's priority). programs: persistent programs per copied
    expert (each PCIe read is issued by an SM: more programs, more reads in flight, fewer SMs for
    the compute it overlaps); block: elements each program moves per iteration; warps: per program."""

    priority: str = "normal"
    programs: int = 32
    block: int = 8192
    warps: int = 4
    # copy_mode dma: how the host loop issues its copies and done writes (offload.dma_api): "native", a C thread
    # calling the CUDA driver (infer/native_copier.py); "driver", a Python thread calling it by ctypes (no torch
    # dispatch, the GIL let go per call); "torch", a Python thread with copy_ and a fill kernel
    dma_api: str = "native"

    def __post_init__(self):
        if self.priority not in ("normal", "high"):
            raise OffloadError(f"offload.copy_priority={self.priority!r}; expected normal or high")
        if not isinstance(self.programs, int) or not 1 <= self.programs <= 1024:
            raise OffloadError(f"offload.copy_programs={self.programs!r}; expected an integer in 1..1024")
        b = self.block
        if not isinstance(b, int) or b < 256 or b > 65536 or b & (b - 1):
            raise OffloadError(f"offload.copy_block={b!r}; expected a power of two in 256..65536")
        if self.warps not in (1, 2, 4, 8, 16):
            raise OffloadError(f"offload.copy_warps={self.warps!r}; expected 1, 2, 4, 8 or 16")
        if self.dma_api not in DMA_APIS:
            raise OffloadError(f"offload.dma_api={self.dma_api!r}; expected native, driver or torch")

    def stream_priority(self) -> int:
        """torch.cuda.Stream's priority (lower is higher; out-of-range values map to the device's highest)."""
        return -100 if self.priority == "high" else 0


# ----------------------------------------------------------------------------------------------- slots
def eager_module_loading() -> bool:
    """Whether CUDA loads every kernel when it starts (CUDA_MODULE_LOADING=EAGER), which copy_mode dma needs.

    With lazy loading (torch's default) a kernel is loaded at its first launch, and loading may wait for the
    kernels running on the GPU. A dma wait kernel spins until the copier thread has issued its copies; if
    the main thread launches a kernel for the first time meanwhile, it blocks (holding the GIL) on the
    spinning kernel, and the copier thread, which needs the GIL, never issues them: on the H200 every wait
    of a fresh process's first dma run timed out, and the same run passed with EAGER."""
    return os.environ.get("CUDA_MODULE_LOADING", "").upper() == "EAGER"


def request_eager_module_loading() -> bool:
    """Set CUDA_MODULE_LOADING=EAGER where nothing has chosen a mode yet (torch sets LAZY when it starts CUDA,
    so this must run before the process's first CUDA call); returns whether EAGER is in effect. Entry points
    that may use copy_mode dma call it first thing."""
    os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
    return eager_module_loading()


class SlotPool:
    """GPU slots for expert weights: pool [P, X]; w_in [P, F, D] and w_out [P, D, F] are views of it
    (the expert FFN reads them through strides), so one expert is one contiguous row to copy.

    Slot p < M*C: cache slot p % C of block p // C. Slot M*C + r*n + j: slot j of staging buffer r. The
    encoder's streamed prefill chunks use slots M*C + j, j < n_prefill, the same slots (the pool holds
    max(R*n, n_prefill) of them after the cache).
    Block m stages into buffer m % R (R = lookahead + 1), so a copy for block m overwrites only the
    buffer last read by block m - R, whose compute the compute stream has passed when the copy is
    issued; one event per block (its copies done) is all the ordering needed.

    copy_mode: "device" (kernels.expert_copy.gather_rows: a kernel reads the pinned store over PCIe
    by ids on the GPU; no host sync, graph-capturable), "dma" (prefetched plans -- a pre-gate's, made
    a block ahead -- by the copy engines, started by a host thread that reads each plan from a pinned
    ring: DmaCopier; graph-capturable; a block's own plan, on the critical path, and the encoder's
    streamed prefill chunks by the device kernel, which starts without the host's reaction time),
    "host" (cudaMemcpyAsync per expert; reads the plan on the host, so one sync per plan), "cpu" (no
    GPU: synchronous copies). "auto": on CUDA dma where its native loop runs (offload.dma_api=native, the
    default, built with the system C compiler), else device (host where the store is not pinned); cpu without a
    GPU. dma with a Python loop (dma_api driver or torch) needs CUDA's kernels loaded eagerly
    (eager_module_loading), which costs device memory outside torch's allocator (~1.1 GB on the H200); the native
    loop does not (it needs no GIL, which a lazily loading launch held: tested in fresh processes with
    CUDA_MODULE_LOADING=LAZY on the H200).

    A compressed store (offload.compress=exp4, expv): the slots hold unpacked bf16 rows. Decode plans land the packed
    chunks in `landing` (dma plans by the copy engines, unpacked by wait() on the compute stream; copy kernel plans
    by the plain copy kernel, unpacked behind it on the copy stream: kernels.expert_pack.unpack_rows); the streamed
    prefill chunks are unpacked as the kernel reads the pinned store (settings PINNED_PROGRAMS, PINNED_WARPS;
    offload.copy_programs / _block / _warps tune the plain copy kernel); host copies are refused. expv's unpack reads
    by gathers, which suit GPU memory and not the link: its landing has a row per slot, in its own memory, and every
    copy, the streamed prefill chunks' too, lands there first (each chunk's first store.expert_bytes).
    """

    def __init__(
        self,
        store: ExpertStore,
        device: torch.device,
        cache_size: int,
        n_stage: int,
        ring: int,
        copy_mode: str = "auto",
        n_prefill: int = 0,
        copy: CopySettings | None = None,
    ):
        self.store, self.device = store, torch.device(device)
        self.copy_settings = copy or CopySettings()
        self.M, self.E, self.C, self.n, self.R = store.M, store.E, cache_size, n_stage, ring
        # slots the encoder's blocks stream their experts through: the staging buffers' slots, shared. The
        # encoder pass never stages (its blocks stream) and every decode plan is fresh (a plan's staging holders
        # are those it fills, never an earlier plan's), so neither reads what the other wrote; every copy into
        # either waits for the compute launched before it (the copy stream waits for it; a dma plan is written
        # by the compute stream), and a run ends with its copies waited for. The pool holds the larger of the two.
        self.n_prefill = n_prefill
        self.prefill_base = self.M * self.C
        self.P = self.M * self.C + max(self.R * self.n, n_prefill)
        self.pool = torch.zeros((self.P, store.slot_X), dtype=store.slot_dtype, device=self.device)  # [P, X]
        self.w_in, self.w_out = store.weights(self.pool)  # [P, F, D], [P, D, F] (Int8Weights when quantized)
        self.cuda = self.device.type == "cuda"
        if copy_mode == "auto":
            device_ok = store.pinned and expert_copy.HAVE_TRITON and store.data.is_pinned()
            if not self.cuda:
                copy_mode = "cpu"
            elif not device_ok:
                copy_mode = "host"
            else:  # the copy engines where the native loop runs here (it needs no eager kernel loading)
                copy_mode = "dma" if native_copier.usable(self.copy_settings.dma_api) else "device"
        interpreting = (
            os.environ.get("TRITON_INTERPRET") == "1"
        )  # tests run the device copy kernel on the CPU
        if store.compress and copy_mode == "host":
            raise OffloadError(f"offload.compress={store.compress} unpacks its experts on the GPU as they are "
                               "copied: use copy_mode device or dma (or auto), or offload.compress=none with copy_mode "
                               "host")
        if copy_mode in ("device", "dma") and not self.cuda and interpreting:
            pass
        elif copy_mode not in ("device", "dma", "host", "cpu") or (copy_mode == "cpu") == self.cuda:
            raise OffloadError(
                f"copy_mode={copy_mode!r} does not fit device {self.device}; "
                "use device, dma or host on CUDA, cpu without a GPU"
            )
        if copy_mode in ("device", "dma") and self.cuda and not (store.pinned and expert_copy.HAVE_TRITON):
            raise OffloadError(f"copy_mode={copy_mode} needs the expert store pinned (offload.pin=true) and "
                               "triton installed; use copy_mode=host")
        if copy_mode == "dma" and self.cuda and not eager_module_loading() and not native_copier.usable(
                self.copy_settings.dma_api):
            api = self.copy_settings.dma_api
            what = ("a Python thread" if api != "native" else
                    "the native loop could not be built here, so a Python thread")
            raise OffloadError(
                f"copy_mode=dma with offload.dma_api={api} ({what}) needs "
                "CUDA_MODULE_LOADING=EAGER, set before the process's first CUDA call (it is "
                f"{os.environ.get('CUDA_MODULE_LOADING', 'unset')!r}): with lazy kernel loading a first kernel "
                "launch can stall the copier thread until its waits time out. python -m infer and "
                "scripts/bench_e2e.py set it; elsewhere export it, or use dma_api=native or copy_mode=device")
        self.copy_mode = copy_mode
        self.copy_stream = (torch.cuda.Stream(self.device, priority=self.copy_settings.stream_priority())
                            if self.cuda else None)
        self.copy_done = [torch.cuda.Event() if self.cuda else None for _ in range(self.M)]
        # per prefill buffer (on the CPU a stand-in: a copy with done= is a prefill chunk's, which copy_mode
        # dma leaves to the device kernel)
        self.prefill_done = [torch.cuda.Event() if self.cuda else object() for _ in range(2)]
        self.stall_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.measure_stall = False
        # CUDA events around each block's copies on the copy stream (eager steps only: timing events
        # cannot sit in a captured graph): (start, end, experts copied) for copy_kernel_stats()
        self.copy_events: list[tuple[torch.cuda.Event, torch.cuda.Event, torch.Tensor]] = []
        self.measure_copy = False
        # no copies launched and none waited for (plans and slot tables still update; the weights read
        # are stale, so results are wrong): the "no-copy" step that stall-by-difference times
        self._skip_copies = False
        # compressed decode plans land the packed chunks in `landing` (a row per slot a decode plan may fill: the
        # caches' and the staging buffers'): a dma plan's by the copy engines, unpacked into the pool's rows at the
        # wait for the block's copies; a copy kernel plan's by the plain copy kernel, unpacked right behind it on the
        # copy stream (faster than unpacking as it reads the store: 142.4 + 7.2 against 157.8 us per switch-base
        # expert on the H200, bench/results/probe-expert-pack-h200-chunked.md). The encoder's streamed prefill
        # chunks, whose slots the landing may share, are unpacked as they are read.
        self.landing_in_pool = False  # (set by _landing)
        self.landing = self._landing() if store.compress and copy_mode in ("dma", "device") else None
        self._unpack_pending: list[list[torch.Tensor]] = [[] for _ in range(self.M)]
        self.dma = DmaCopier(self) if copy_mode == "dma" else None
        self._dma_posted = [False] * self.M  # block m has a dma plan its wait() has not covered yet
        # The pool's first decode step sends its prefetched plans to the copy kernel: it launches (and so
        # loads) every kernel of the step before any dma wait spins. CUDA_MODULE_LOADING=EAGER
        # (eager_module_loading) loads the kernels linked into torch and CUDA's libraries at start-up, but
        # Triton loads each of its kernels at its first launch, and a load may wait for the running
        # kernels, a spinning wait among them.
        self._dma_on = False
        self._dma_first_step: set[int] = set()
        self._dma_held = 0  # inside dma_held(): every plan takes the copy kernel

    def _landing(self) -> torch.Tensor:
        """uint8 [L, nbytes], L = M*C + R*n (every slot a dma plan fills): in the pool's rows past the staging
        buffers when they hold it (those rows are the encoder's streaming slots, which no decode step reads, and
        the encoder pass never stages: a decode plan's copy runs after the pass's compute), else its own memory."""
        L, nb = self.M * self.C + self.R * self.n, self.store.layout.nbytes
        if self.store.lands_first:  # every slot, the streamed prefill chunks' too, in its own memory
            return torch.empty((self.P, nb), dtype=torch.uint8, device=self.device)
        spare = self.pool[L:]  # rows past the caches and the staging buffers
        self.landing_in_pool = spare.numel() * spare.element_size() >= L * nb
        if self.landing_in_pool:
            return spare.reshape(-1).view(torch.uint8)[: L * nb].view(L, nb)
        return torch.empty((L, nb), dtype=torch.uint8, device=self.device)

    def close(self) -> None:
        """Stop the dma copier's thread (copy_mode dma); raises OffloadError where its copies failed."""
        if self.dma is not None:
            dma, self.dma = self.dma, None
            dma.close()

    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def copy(self, m: int, src_n: torch.Tensor, dst_n: torch.Tensor, done=None, prefetch: bool = False,
             behind: bool = False, early: bool = False) -> None:
        """Copy expert src_n[j] of block m into slot dst_n[j] where src_n[j] >= 0. On CUDA this
        returns at once: the copy runs on the copy stream once the compute stream has passed this point.
        done: the event recorded after the copies (block m's by default). prefetch: the plan was made
        ahead of block m (copy_mode dma hands it to the copier). behind: the plan follows a plan of block m
        not yet waited for (a first-block guess, then its verification) and goes where that one went, so
        that the two run in order (their slots may be the same). early: the first-block guess's plan, whose copy
        the dma copier may have started already (DmaCopier.enable_early)."""
        if self.skip_copies:
            return
        dma = self.dma is not None and done is None and (
            (prefetch and self._dma_live(m)) or (behind and self._dma_posted[m])
        )  # prefetched plans, and the plans behind them
        if dma:
            self._dma_posted[m] = True
        if not self.cuda:  # synchronous (the kernels under TRITON_INTERPRET in tests)
            self._launch(m, src_n, dst_n, dma, landed=done is None, early=early)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        # the per-block copies (the decode path's), not prefill's; dma's run on the copier's stream
        timed = self.measure_copy and done is None and not dma
        with torch.cuda.stream(self.copy_stream):
            if timed:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(self.copy_stream)
            self._launch(m, src_n, dst_n, dma, landed=done is None, early=early)  # dma: copy_done[m] = "posted"
            if timed:
                b.record(self.copy_stream)
                self.copy_events.append((a, b, (src_n >= 0).sum()))
            (self.copy_done[m] if done is None else done).record(self.copy_stream)

    @property
    def skip_copies(self) -> bool:
        """No copies launched and none waited for (plans and slot tables still update; the weights read are stale,
        so results are wrong): the "no-copy" step that stall-by-difference times."""
        return self._skip_copies

    @skip_copies.setter
    def skip_copies(self, value: bool) -> None:
        self._skip_copies = bool(value)
        self._early_update()

    def _early_update(self) -> None:
        """The dma copier's early guess copies run exactly while plans go to it and copies are made."""
        if self.dma is not None:
            self.dma.early_on = self._dma_on and not self._dma_held and not self._skip_copies

    def _dma_live(self, m: int) -> bool:
        """Whether block m's prefetched plan goes to the dma copier: from the pool's second decode step on
        (a block's second prefetched plan means the whole first step has been launched), outside dma_held()."""
        if not self._dma_on:
            if m in self._dma_first_step:
                self._dma_on = True
                self._early_update()
            else:
                self._dma_first_step.add(m)
        return self._dma_on and not self._dma_held

    @contextmanager
    def dma_held(self):
        """Inside, every plan takes the copy kernel and no dma wait spins (the first-step bookkeeping goes on as
        outside, so a step captured afterwards posts its plans as it would have). For eager steps whose Python
        may launch a kernel for the first time: a Triton kernel's first launch loads its module, and the load
        waits for the GPU while holding the CUDA driver back from the copier's calls, so a dma wait spinning
        meanwhile never ends before its timeout. On the H200 that hit a CUDA graph's warm-up steps: beam search's
        update kernel (a new specialization) loaded while switch-large-128 beam 4 prefetch_all waited, the copier's
        cuMemcpyHtoDAsync held 6.4-67 s, until the wait's poll budget ran out (PGMOE_DMA_WATCHDOG_S's stacks).
        On CUDA it first waits for the GPU: a plan posted before (its wait inside) has been copied by then."""
        if self.dma is not None and self.cuda and not self._dma_held:
            torch.cuda.synchronize(self.device)
        self._dma_held += 1
        self._early_update()
        try:
            yield self
        finally:
            self._dma_held -= 1
            self._early_update()

    def _launch(self, m: int, src_n: torch.Tensor, dst_n: torch.Tensor, dma: bool, landed: bool = False,
                early: bool = False) -> None:
        """Start block m's copies on the current stream: the plan handed to the dma copier, the device copy
        kernel, or one cudaMemcpyAsync per expert (host). Compressed: a dma plan lands packed, and wait() unpacks
        the landed rows (a row per filled slot, -1 for the plan's idle entries, made here on the current stream,
        behind the plan); a copy kernel plan lands packed where `landed` (a decode plan, into slots with landing
        rows) and is unpacked right behind, else the kernel unpacks as it reads the store."""
        cs = self.copy_settings
        if dma:
            self.dma.post(m, src_n, dst_n, flags=mailbox.FLAG_EARLY if early else 0)
            if self.store.compress:
                self._unpack_pending[m].append(torch.where(src_n >= 0, dst_n, -1))
        elif self.copy_mode in ("device", "dma"):
            src, dst = self._rows(m)
            if self.store.compress and (landed or self.store.lands_first):
                expert_copy.gather_rows(src.view(torch.int16), src_n, self.landing.view(torch.int16), dst_n,
                                        cs.programs, cs.block, cs.warps, cols=self.store.expert_bytes // 2)
                self._unpack(torch.where(src_n >= 0, dst_n, -1))
            elif self.store.compress:
                expert_pack.unpack_rows(src, src_n, dst, self.store.layout, dst_n, num_programs=self.PINNED_PROGRAMS,
                                        num_warps=self.PINNED_WARPS, ahead=True)
            else:
                expert_copy.gather_rows(src, src_n, dst, dst_n, cs.programs, cs.block, cs.warps)
        else:
            self._copy_host(m, src_n, dst_n)

    def _rows(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block m's chunks and the pool as rows for the copy kernel (int8 chunks as int32 words: the
        kernel moves 4 bytes per element either way)."""
        src, dst = self.store.data[m], self.pool
        if self.store.quantize:
            src, dst = src.view(torch.int32), dst.view(torch.int32)
        return src, dst

    def _copy_host(self, m, src_n, dst_n) -> None:
        pairs = torch.stack([src_n, dst_n], 1)
        for e, p in pairs[src_n >= 0].tolist():  # host sync on CUDA
            if self.store.compress:  # (copy_mode cpu only: host is refused with compression)
                self.pool[p].copy_(self.store.chunk(m, e))
            else:
                self.pool[p].copy_(self.store.data[m, e], non_blocking=True)

    # The landed rows' unpack (GPU memory to GPU memory, on the stream that waits for it): a wide grid, 1024 programs
    # a row: 7.2 us per switch-base expert on the H200, 14.6 with 128. The copy kernel's unpack as it reads the pinned
    # store (the streamed prefill chunks'): 16 programs of 8 warps a row, the next chunk's loads issued ahead: 157.8
    # us per switch-base expert, 163.6 with the plain copy kernel's 32 x 4, 182.9 with 64 x 4 (fewer programs read
    # the pinned store faster, down to 16; bench/results/probe-expert-pack-h200-chunked.md).
    UNPACK_PROGRAMS, UNPACK_WARPS = 1024, 4
    PINNED_PROGRAMS, PINNED_WARPS = 16, 8

    def _unpack_landed(self, m: int) -> None:
        """On the current (compute) stream, after block m's dma wait: unpack the rows its plans landed."""
        pending, self._unpack_pending[m] = self._unpack_pending[m], []
        for rows in pending:  # in the plans' order (a later plan's slot overwrites an earlier one's)
            self._unpack(rows)

    def _unpack(self, rows: torch.Tensor) -> None:
        """Unpack landing rows `rows` (-1: none) into the same pool rows, on the current stream."""
        if self.store.compress == "expv":  # (probe-expert-vlc-h200.md: its default launch settings)
            expert_vlc.unpack_rows(self.landing, rows, self.pool, self.store.layout, rows)
        else:
            expert_pack.unpack_rows(self.landing, rows, self.pool, self.store.layout, rows,
                                    num_programs=self.UNPACK_PROGRAMS, num_warps=self.UNPACK_WARPS, ahead=False)

    def wait(self, m: int, done=None) -> None:
        """The compute stream waits for block m's copies (only those), or for the event done."""
        if self.skip_copies:
            return
        dma = self.dma is not None and done is None and self._dma_posted[m]
        if dma:
            self._dma_posted[m] = False
        if not self.cuda:
            if dma:
                self.dma.wait(m)
                self._unpack_landed(m)
            return
        event = self.copy_done[m] if done is None else done
        compute = torch.cuda.current_stream(self.device)
        if self.measure_stall:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(compute)
        compute.wait_event(event)
        if dma:
            self.dma.wait(m)  # after the post (the event): until the copier's copies are done
            self._unpack_landed(m)
        if self.measure_stall:
            b.record(compute)
            self.stall_events.append((a, b))

    def copy_kernel_stats(self) -> dict | None:
        """The timed per-block copies (measure_copy): their bytes, busy time and bandwidth while copying."""
        if not self.cuda or not self.measure_copy:
            return None
        torch.cuda.synchronize(self.device)
        timed = [(a.elapsed_time(b), int(n)) for a, b, n in self.copy_events]
        timed = [(ms, n) for ms, n in timed if n > 0]  # all hits: no copy ran
        ms = sum(t for t, _ in timed)
        nbytes = sum(n for _, n in timed) * self.store.expert_bytes
        return {"copies": len(timed), "bytes": nbytes, "busy_ms": ms,
                "GBps": nbytes / (ms / 1e3) / 1e9 if ms > 0 else None}

    def stall_ms(self) -> float | None:
        if not self.cuda or not self.measure_stall:
            return None
        torch.cuda.synchronize(self.device)
        return sum(a.elapsed_time(b) for a, b in self.stall_events)


# ----------------------------------------------------------------------------------------------- dma
class _Driver:
    """The CUDA driver calls of the dma copier: made through ctypes by the Python thread (offload.dma_api=driver;
    each lets go of the GIL while it runs and skips torch's dispatch per copy), or handed as function addresses to
    the native loop (dma_api=native), with the streams, event and context it needs."""

    EVENTS = 16

    def __init__(self):
        lib = ctypes.CDLL("libcuda.so.1")
        p, u64, sz = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t
        self.memcpy = lib.cuMemcpyHtoDAsync_v2
        self.memcpy.argtypes, self.memcpy.restype = [u64, p, sz, p], ctypes.c_int
        self.record = lib.cuEventRecord
        self.record.argtypes, self.record.restype = [p, p], ctypes.c_int
        self.wait_event = lib.cuStreamWaitEvent
        self.wait_event.argtypes, self.wait_event.restype = [p, p, ctypes.c_uint], ctypes.c_int
        self.write64 = getattr(lib, "cuStreamWriteValue64_v2", None) or lib.cuStreamWriteValue64
        self.write64.argtypes, self.write64.restype = [p, u64, u64, ctypes.c_uint], ctypes.c_int
        self._destroy = getattr(lib, "cuEventDestroy_v2", None) or lib.cuEventDestroy
        self._destroy.argtypes, self._destroy.restype = [p], ctypes.c_int
        create = lib.cuEventCreate
        create.argtypes, create.restype = [ctypes.POINTER(p), ctypes.c_uint], ctypes.c_int
        self.events = []  # done[m]'s events, one per plan in turn (no re-record of one still pending behind a copy)
        for _ in range(self.EVENTS):
            ev = p()
            self.check(create(ctypes.byref(ev), 2), "cuEventCreate")  # CU_EVENT_DISABLE_TIMING
            self.events.append(ev)
        self._event_ptrs = (p * len(self.events))(*self.events)
        self.lib = lib
        self._ctx_device: int | None = None

    def calls(self) -> dict[str, int]:
        """The driver calls as function addresses (the native copier's struct, infer/native_copier.py)."""
        a = native_copier.address
        return {"memcpy_h2d": a(self.memcpy), "record": a(self.record), "wait_event": a(self.wait_event),
                "write64": a(self.write64), "set_ctx": a(self.lib.cuCtxSetCurrent)}

    def stream_create(self) -> int:
        """A new non-blocking stream in the current context (cuStreamCreate), as an integer handle."""
        st = ctypes.c_void_p()
        self.check(self.lib.cuStreamCreate(ctypes.byref(st), ctypes.c_uint(1)), "cuStreamCreate")  # NON_BLOCKING
        return st.value

    def stream_destroy(self, st: int) -> None:
        destroy = getattr(self.lib, "cuStreamDestroy_v2", None) or self.lib.cuStreamDestroy
        destroy(ctypes.c_void_p(st))

    def primary_context(self, index: int) -> int:
        """Device index's primary context (torch's), retained until close(): for a native thread to make current."""
        p = ctypes.c_void_p
        dev, ctx = ctypes.c_int(), p()
        self.check(self.lib.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(index)), "cuDeviceGet")
        self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        self._ctx_device = dev.value
        return ctx.value

    def close(self) -> None:
        """Release the event and the retained context (after the device is synchronized and the thread is gone)."""
        for ev in self.events:
            self._destroy(ev)
        self.events = []
        if self._ctx_device is not None:
            release = getattr(self.lib, "cuDevicePrimaryCtxRelease_v2", None) or self.lib.cuDevicePrimaryCtxRelease
            release(ctypes.c_int(self._ctx_device))
            self._ctx_device = None

    @staticmethod
    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise OffloadError(f"copy_mode=dma: {what} failed (CUDA driver error {rc}); use offload.dma_api=torch")


try:  # give the GIL and the core away for a moment (a ctypes call runs without the GIL)
    _yield_gil = ctypes.CDLL(None).sched_yield
except (OSError, AttributeError):  # pragma: no cover - not Linux
    def _yield_gil():
        time.sleep(0)


DMA_HOST_COPY_NOTE = (
    "A wait times out when the copier cannot issue its copies. A usual cause: a blocking copy of a CUDA tensor to "
    "pageable host memory (.cpu(), .item(), .tolist(), print) made while a decode step is in flight: the CUDA "
    "driver serializes the copier thread's calls behind it, and it waits for the step, which waits for the copier. "
    "Wait for the step first (an event's synchronize(), as models.generate.greedy does) or copy into pinned memory "
    "with non_blocking=True. Another: a kernel launched for the first time (its module loads, which waits for the "
    "GPU) while a step is in flight; eager steps that may do so run inside SlotPool.dma_held(), as a CUDA graph's "
    "warm-up does. PGMOE_DMA_WATCHDOG_S=2 prints every thread's stack when the copier stalls"
)


class DmaCopier:
    """copy_mode "dma": the copy engines move the experts, a host loop starts them (kernels/mailbox.py
    has the handshake). post(m, src, dst) runs on the pool's copy stream (capturable): a kernel writes the
    plan into a ring in pinned host memory, then the head; the loop handles new entries in order: one
    cudaMemcpyAsync per expert on its own stream, then done[m] on a signal stream behind an event (so that
    the next plan's copies need not wait for that write); wait(m) holds the compute stream until done[m] >= posted[m].

    The loop (offload.dma_api): native, a C thread (infer/native_copier.py) that needs no GIL; driver / torch, a
    Python thread that gives the GIL away between polls. Either polls the head without pause and, after IDLE_S
    without a post, sleeps SLEEP_S between polls. A wait that times out (MAX_ITERS polls on the GPU), a ring
    overrun or an error in the loop is raised by close() (the run's result is then wrong, so it must not be
    reported)."""

    RING = 32  # plans in flight at most (a step posts one per MoE block; the host keeps up within a block)
    # polls of the wait kernel on a GPU before it counts a timeout: generous, since the host thread may not
    # get the GIL while the main thread sits in a long native call (a first run compiles its kernels between
    # a plan's post and its wait; 2M polls timed out there on the H200)
    MAX_ITERS = 40_000_000  # (PGMOE_DMA_WAIT_POLLS overrides it; scripts/probe_dma_wait.py times a poll)
    MAX_ITERS_INTERPRETED = 200_000  # the CPU interpreter is ~1e3 x slower per poll
    IDLE_S = 0.05
    SLEEP_S = 0.0005

    def __init__(self, pool: SlotPool):
        self.pool = pool
        M, n, dev = pool.M, pool.n, pool.device
        self.M, self.n = M, n
        self.cuda = dev.type == "cuda"
        W = 2 * n + 3  # [m, posted[m], src..., dst..., g]
        self.head = torch.zeros(1, dtype=torch.int64, device=dev)
        # the ring the post kernel writes, in pinned host memory, and the head it writes after each entry
        self.ring_h = torch.zeros(self.RING, W, dtype=torch.int64, pin_memory=self.cuda)
        self.head_h = torch.zeros(1, dtype=torch.int64, pin_memory=self.cuda)
        self.posted = torch.zeros(M, dtype=torch.int64, device=dev)
        self.done = torch.zeros(M, dtype=torch.int64, device=dev)
        self.err = torch.zeros(1, dtype=torch.int32, device=dev)
        self._signal_event = torch.cuda.Event() if self.cuda else None
        self.device_index = (dev.index if dev.index is not None else torch.cuda.current_device()) if self.cuda else None
        self.max_iters = self.MAX_ITERS if self.cuda else self.MAX_ITERS_INTERPRETED
        polls = os.environ.get("PGMOE_DMA_WAIT_POLLS")
        if polls:
            try:
                self.max_iters = int(float(polls))
            except ValueError:
                raise OffloadError(f"PGMOE_DMA_WAIT_POLLS={polls!r}: expected a number of polls (e.g. 4e7)") from None
            if self.max_iters < 1:
                raise OffloadError(f"PGMOE_DMA_WAIT_POLLS={polls!r}: expected at least 1 poll")
        # done[M - 1] (the decoder's last MoE block: the step's last copies, followed by nothing until the next step's
        # first plan) is written right behind its copies on their stream, not behind an event on the signal stream:
        # one hop less between the step's last copy and its tail (PGMOE_DMA_DIRECT_LAST=0: the signal stream too)
        self.direct_block = M - 1 if os.environ.get("PGMOE_DMA_DIRECT_LAST", "1") != "0" else -1
        self._issued = 0  # plans handled by the Python thread
        self._trace: list | None = None  # see trace
        # offload.dma_api: native (the default): the host loop in C (infer/native_copier.py), no GIL; driver: a
        # Python thread calling the CUDA driver by ctypes; torch: a Python thread with torch's copy_. Measured on
        # the H200: bench/results/e2e-h200-native-ab.md (native vs driver), e2e-h200-driver*.md (driver vs torch).
        # Each falls back to the next where it cannot run here (no C compiler, no libcuda); self.api is the one used
        # and self.fallback says why.
        want = pool.copy_settings.dma_api
        self.fallback: str | None = None
        self._driver = None
        if self.cuda and want in ("native", "driver"):
            try:
                self._driver = _Driver()
            except (OSError, AttributeError) as e:  # no libcuda.so.1 or an older driver: torch's copy_ instead
                self._driver, self.fallback = None, f"the CUDA driver could not be loaded ({e})"
        self._native = self._lib = None
        if want == "native" and (self._driver is not None or not self.cuda):
            try:
                self._lib = native_copier.build()
            except native_copier.NativeUnavailable as e:
                self.fallback = str(e)
        if self._lib is not None:
            self.api = "native"
        else:
            self.api = "driver" if self._driver is not None else "torch"
        # The loop's streams: the copies', and a second one for done[m] (written behind an event, not between two
        # plans' copies). Made by the driver, never torch.cuda.Stream(): torch hands those out round-robin from a
        # small pool, so after a few dozen pools one could be the stream a graph capture is recording on, and the
        # loop's copies and writes (from another thread) would land in the capture, never run, and leave the waits
        # to time out (seen on the H200 in a batch sweep: CUDA error 905, capture isolation, then timeouts).
        self._own_streams: list[int] = []
        if self.cuda and self._driver is not None:
            with torch.cuda.device(dev):
                self._own_streams = [self._driver.stream_create(), self._driver.stream_create()]
            self.stream, self.signal = (torch.cuda.ExternalStream(s, device=dev) for s in self._own_streams)
        else:
            self.stream = torch.cuda.Stream(dev) if self.cuda else None
            self.signal = torch.cuda.Stream(dev) if self.cuda else None
        # slot and expert addresses (driver, native) or views (torch) made once: the thread's cost per plan is on
        # the first copy's critical path
        slots = pool.landing if pool.landing is not None else pool.pool  # compressed: packed chunks land there
        if self.api != "torch":
            row = slots.stride(0) * slots.element_size()
            self._row_bytes = pool.store.expert_bytes  # each chunk's first bytes (all of it but for expv)
            self._slot_ptr = [slots.data_ptr() + p * row for p in range(slots.shape[0])]
            srow = pool.store.data.stride(1) * pool.store.data.element_size()
            self._store_ptr = [[pool.store.data[b].data_ptr() + e * srow for e in range(pool.store.data.shape[1])]
                               for b in range(M)]
        else:
            cb = pool.store.expert_bytes // pool.store.data.element_size()  # elements copied per chunk
            self._slot_rows = [r[:cb] for r in slots.unbind(0)]
            self._store_rows = [[r[:cb] for r in pool.store.data[b].unbind(0)] for b in range(M)]
        self._done = list(self.done.unbind(0))
        self.error: BaseException | None = None
        self._stop = False
        self._load_kernels()
        self._thread = None
        self._stop_native = None
        if self.api == "native":
            self._start_native()
        else:
            self._thread = threading.Thread(target=_copier_loop, args=(weakref.ref(self),), daemon=True,
                                            name="pgmoe-dma-copier")
            self._thread.start()
        self._watchdog = None
        limit = os.environ.get("PGMOE_DMA_WATCHDOG_S")
        if limit:
            try:
                seconds = float(limit)
            except ValueError:
                raise OffloadError(f"PGMOE_DMA_WATCHDOG_S={limit!r}: expected seconds (e.g. 2)") from None
            self._watchdog = _Watchdog(self, seconds)

    TRACE_PLANS = 512  # plans the native loop can trace per traced pass (events made once)

    def _start_native(self) -> None:
        """Fill the C loop's struct and start its thread; a finalizer stops it (and keeps what it reads alive)."""
        c = native_copier.Copier()
        slot = (ctypes.c_uint64 * len(self._slot_ptr))(*self._slot_ptr)
        flat = [a for per_block in self._store_ptr for a in per_block]
        store = (ctypes.c_uint64 * len(flat))(*flat)
        c.head, c.ring = self.head_h.data_ptr(), self.ring_h.data_ptr()
        c.R, c.n, c.M, c.E, c.P = self.RING, self.n, self.M, len(self._store_ptr[0]), len(self._slot_ptr)
        c.slot_ptr, c.store_ptr = ctypes.addressof(slot), ctypes.addressof(store)
        c.row_bytes, c.done_ptr = self._row_bytes, self.done.data_ptr()
        if self.cuda:
            calls = self._driver.calls()
            c.ctx = self._driver.primary_context(self.device_index)
            c.stream, c.signal = self.stream.cuda_stream, self.signal.cuda_stream
            c.events, c.n_events = ctypes.addressof(self._driver._event_ptrs), len(self._driver.events)
        else:  # a CPU "device": the host stand-ins
            calls = native_copier.host_calls(self._lib)
        for name, addr in calls.items():
            setattr(c, name, addr)
        c.idle_ns, c.sleep_ns = int(self.IDLE_S * 1e9), int(self.SLEEP_S * 1e9)
        c.direct_m = self.direct_block
        self._trace_events: list = []
        self._trace_ptrs = (ctypes.c_void_p * (2 * self.TRACE_PLANS))()
        self._trace_meta = (ctypes.c_int64 * (3 * self.TRACE_PLANS))()
        c.trace_events, c.trace_meta = ctypes.addressof(self._trace_ptrs), ctypes.addressof(self._trace_meta)
        rc = self._lib.pgmoe_copier_start(ctypes.byref(c))
        if rc:
            raise OffloadError(f"copy_mode=dma: starting the native copier's thread failed (error {rc}); use "
                               "offload.dma_api=driver")
        self._native = c
        self._keep_extra: list = []  # what the loop reads that comes later (enable_early's buffer)
        keep = (slot, store, self._trace_ptrs, self._trace_meta, self.ring_h, self.head_h, self.done, self.pool.pool,
                self.pool.store.data, self._keep_extra)
        self._stop_native = weakref.finalize(self, _stop_native, self._lib, c, keep)

    def call_times(self) -> dict | None:
        """The native loop's driver calls so far: per kind, calls and mean microseconds (None: another loop)."""
        return self._native.call_times() if self._native is not None else None

    @property
    def slowest_call(self) -> dict | None:
        """The native loop's slowest driver call (ms, plan, call) or None (another loop, or no call yet)."""
        return self._native.slowest_call() if self._native is not None else None

    @property
    def issued(self) -> int:
        """Plans handled by the host loop."""
        return int(self._native.seen) if self._native is not None else self._issued

    @property
    def trace(self) -> list | None:
        """A list (set one to start tracing, None to stop; CUDA only): (g, block, start, end, experts copied) per
        plan, start and end being timing events around its copies on the copier's stream."""
        c = self._native
        if c is None or self._trace is None:
            return self._trace
        n = int(c.trace_n)
        ev, meta = self._trace_events, self._trace_meta
        return [(int(meta[3 * k]), int(meta[3 * k + 1]), ev[2 * k], ev[2 * k + 1], int(meta[3 * k + 2]))
                for k in range(n)]

    @trace.setter
    def trace(self, value: list | None) -> None:
        c = self._native
        if c is None:
            self._trace = value
            return
        c.trace_cap = 0  # the loop stops tracing (between two plans) before the slots are reused
        self._trace = value
        if value is None or not self.cuda:
            return
        if not self._trace_events:  # made once; each recorded once here so that it has a CUDA event to hand over
            with torch.cuda.stream(self.stream):
                for k in range(2 * self.TRACE_PLANS):
                    e = torch.cuda.Event(enable_timing=True)
                    e.record()
                    self._trace_events.append(e)
                    self._trace_ptrs[k] = e.cuda_event
            torch.cuda.synchronize(self.pool.device)
        c.trace_n = 0
        c.trace_cap = self.TRACE_PLANS

    def _load_kernels(self) -> None:
        """Launch once every kernel the handshake uses (post and wait on scratch copies of the ring, the
        copier's done-count fill), so that none is loaded (Triton's at their first launch) while a wait spins."""
        # the plans' dtypes and every block index and offset, as Triton compiles a variant per argument kind
        head, posted = torch.zeros_like(self.head), torch.zeros_like(self.posted)
        ring = torch.zeros(self.ring_h.shape, dtype=torch.int64, pin_memory=self.cuda)  # scratch pinned copies
        head_h = torch.zeros(1, dtype=torch.int64, pin_memory=self.cuda)
        src = torch.full((self.n,), -1, dtype=torch.int32, device=self.pool.device)
        dst = torch.zeros(self.n, dtype=torch.int32, device=self.pool.device)
        for m in range(self.M):
            mailbox.post(m, src, dst, ring, head, posted, head_host=head_h)
        done, err = posted.clone(), torch.zeros_like(self.err)
        for m in range(self.M):
            mailbox.wait(done[m : m + 1], posted[m : m + 1], err, self.max_iters)
        with torch.cuda.stream(self.signal):  # (no stream on the CPU: a no-op context)
            for d in self._done:
                d.fill_(1)
            self.done.zero_()
        if self.cuda:
            torch.cuda.synchronize(self.pool.device)
        if int(err[0]) or not torch.equal(head.cpu(), torch.tensor([self.M])) or int(head_h[0]) != self.M:
            raise OffloadError(f"copy_mode=dma: the handshake's kernels failed their start-up check (head "
                               f"{head.tolist()} after {self.M} posts, {int(err[0])} timeouts)")

    def post(self, m: int, src_n: torch.Tensor, dst_n: torch.Tensor, flags: int = 0) -> None:
        """On the current (copy) stream: hand block m's plan to the thread (flags: mailbox.FLAG_EARLY for the
        first-block guess's plan)."""
        if src_n.numel() != self.n or dst_n.numel() != self.n:
            raise OffloadError(f"copy_mode=dma: a plan of {src_n.numel()} entries for block {m}; the "
                               f"ring holds {self.n}")
        # the kernel writes the plan, then (behind a system fence) the host's head, into pinned memory
        mailbox.post(m, src_n, dst_n, self.ring_h, self.head, self.posted, head_host=self.head_h, flags=flags)

    def enable_early(self, m: int, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The early first-block guess (native loop only; None elsewhere): returns (out, seq) for
        kernels.greedy.EarlyGuess, out int64 [2] in pinned memory, seq int64 [1] on the device. When a one-row greedy
        choice writes (seq, expert) there, the loop copies that expert of block m into `slot` at once, ahead of the
        next step's start; the next step's guess plan for block m (posted with FLAG_EARLY, planned into the same
        slot: a fresh plan of one entry with no cache slots) then finds the copy done and only signals it. Why: the
        plan's kernels at the step's start and their post come ~7 us after the choice (bench/results/
        e2e-h200-*-levers.md: the first copy 15-25 us into the step). Any plan copying into `slot` first voids it."""
        if self._native is None or not 0 <= slot < len(self._slot_ptr) or not 0 <= m < self.M or self.n != 1:
            return None
        out = torch.full((2,), 0, dtype=torch.int64, pin_memory=self.cuda)
        seq = torch.zeros(1, dtype=torch.int64, device=self.pool.device)
        c = self._native
        c.early_m, c.early_slot, c.early_seen, c.early_e = m, slot, 0, -1
        self._keep_extra.append(out)  # alive as long as the loop that reads it
        c.early = out.data_ptr()
        return out, seq

    @property
    def early_on(self) -> bool:
        return bool(self._native is not None and self._native.early_on)

    @early_on.setter
    def early_on(self, value: bool) -> None:
        if self._native is not None:
            self._native.early_on = int(bool(value))

    def early_counts(self) -> dict | None:
        """The loop's early copies and the guess plans that found theirs done (None: early guess not enabled)."""
        c = self._native
        if c is None or not c.early:
            return None
        return {"copied": int(c.early_copied), "used": int(c.early_used)}

    def wait(self, m: int) -> None:
        """On the current (compute) stream, ordered after block m's post: hold until its copies are done."""
        mailbox.wait(self.done[m : m + 1], self.posted[m : m + 1], self.err, self.max_iters)

    def _poll(self, seen: list[int]) -> bool:
        """Handle the ring's new entries (seen[0]: the last handled); True when there was one."""
        head = int(self.head_h.numpy()[0])
        if head <= seen[0]:
            return False
        if head - seen[0] > self.RING:
            raise OffloadError(f"copy_mode=dma: {head - seen[0]} plans in flight, more than the ring's "
                               f"{self.RING}")
        n, ring = self.n, self.ring_h.numpy()
        for g in range(seen[0] + 1, head + 1):
            row = ring[g % self.RING].tolist()
            if row[-1] != g:
                raise OffloadError(f"copy_mode=dma: ring entry {g} reads as plan {row[-1]}")
            m, b, src, dst = row[0] & 0xFFFFFFFF, row[1], row[2 : 2 + n], row[2 + n : 2 + 2 * n]
            # on CUDA the thread's current stream is the copier's (_copier_loop); on the CPU copies are synchronous
            trace = self._trace if self.cuda else None
            if trace is not None:
                ev0 = torch.cuda.Event(enable_timing=True)
                ev0.record()
            drv = self._driver
            copied = 0
            if drv is not None:
                stream, ptrs = self.stream.cuda_stream, self._store_ptr[m]
                for e, p in zip(src, dst):
                    if e >= 0 and p >= 0:
                        drv.check(drv.memcpy(self._slot_ptr[p], ptrs[e], self._row_bytes, stream),
                                  "cuMemcpyHtoDAsync")
                        copied += 1
            else:
                slots, experts = self._slot_rows, self._store_rows[m]
                for e, p in zip(src, dst):
                    if e >= 0 and p >= 0:
                        slots[p].copy_(experts[e], non_blocking=self.cuda)
                        copied += 1
            if trace is not None:
                ev1 = torch.cuda.Event(enable_timing=True)
                ev1.record()
                trace.append((g, m, ev0, ev1, copied))
            if drv is not None and m == self.direct_block:  # the step's last block: on the copies' stream itself
                drv.check(drv.write64(self.stream.cuda_stream, self.done.data_ptr() + 8 * m, b, 0),
                          "cuStreamWriteValue64")
            elif drv is not None:  # the same by the driver: an event, then a stream memory write of done[m] = b
                sig = self.signal.cuda_stream
                ev = drv.events[g % len(drv.events)]  # one per plan in turn, as the native loop
                drv.check(drv.record(ev, self.stream.cuda_stream), "cuEventRecord")
                drv.check(drv.wait_event(sig, ev, 0), "cuStreamWaitEvent")
                drv.check(drv.write64(sig, self.done.data_ptr() + 8 * m, b, 0), "cuStreamWriteValue64")
            elif self.cuda:  # done[m] on the signal stream, so the next plan's copies start at once
                self._signal_event.record()
                self.signal.wait_event(self._signal_event)
                with torch.cuda.stream(self.signal):
                    self._done[m].fill_(b)
            else:
                self._done[m].fill_(b)
            seen[0] = g
            self._issued += 1
        return True

    def close(self) -> None:
        """Stop the thread; raise OffloadError where a wait timed out or the thread failed."""
        if self._watchdog is not None:
            self._watchdog.stop()
        if self.cuda:
            torch.cuda.synchronize(self.pool.device)
        self._stop = True
        native_error = None
        if self._stop_native is not None:
            self._stop_native()  # stops and joins the C loop (once)
            native_error = self._native.error_text()
            if native_error is not None:
                self._native.error = 0
        elif self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        alive = self._thread is not None and self._thread.is_alive()
        if self.cuda and not alive:  # copies the loop issued after the first sync land before the pool can go
            torch.cuda.synchronize(self.pool.device)
        if self._driver is not None and not alive:  # its streams, event and context, once nothing can use them
            for st in self._own_streams:
                self._driver.stream_destroy(st)
            self._own_streams = []
            self._driver.close()
            self._driver = None
        timeouts = int(self.err.item())
        if self.error is not None or timeouts or native_error:
            slow = self.slowest_call  # where the loop itself was held back (a blocking call elsewhere)
            err, self.error = self.error, None
            self.err.zero_()
            what = ([f"the host copier failed ({type(err).__name__}: {err})"] if err is not None else []) + (
                [f"the native copier failed: {native_error}"] if native_error else []) + (
                [f"its slowest driver call: {slow['call']} for plan {slow['plan']}, {slow['ms']:.1f} ms; plans "
                 f"handled {self.issued}"] if slow is not None else []) + (
                [f"{timeouts} wait(s) for its copies timed out: experts may be stale, so this run's results "
                 "are wrong. " + DMA_HOST_COPY_NOTE] if timeouts else [])
            raise OffloadError("copy_mode=dma: " + "; ".join(what) + "; use offload.copy_mode=device") from err


class _Watchdog:
    """PGMOE_DMA_WATCHDOG_S=T (a diagnostic): where the copier has plans to handle but handles none for T seconds,
    every thread's Python stack goes to stderr (faulthandler), once per stall: what the process was doing while
    the copier was held back (infer.offload.DMA_HOST_COPY_NOTE). A thread that holds the GIL while it blocks keeps
    this one from running too, so each tick also arms faulthandler's own timer (it needs no GIL) for 2 T."""

    def __init__(self, copier: DmaCopier, limit_s: float):
        if not limit_s > 0:
            raise OffloadError(f"PGMOE_DMA_WATCHDOG_S={limit_s}: expected a positive number of seconds")
        self.limit_s, self._stop = limit_s, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(weakref.ref(copier),), daemon=True,
                                        name="pgmoe-dma-watchdog")
        self._thread.start()

    def _run(self, ref) -> None:
        import faulthandler
        import sys

        last, since, dumped = -1, time.monotonic(), False
        while not self._stop.wait(self.limit_s / 4):
            c = ref()
            if c is None:
                break
            faulthandler.dump_traceback_later(2 * self.limit_s, exit=False)
            seen, head = c.issued, int(c.head_h[0])
            del c
            now = time.monotonic()
            if seen != last or head <= seen:
                last, since, dumped = seen, now, False
            elif now - since > self.limit_s and not dumped:
                print(f"[pgmoe dma watchdog] the copier has handled no plan for {now - since:.1f} s "
                      f"(handled {seen}, posted {head}); every thread's stack:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(all_threads=True)
                dumped = True
        faulthandler.cancel_dump_traceback_later()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _stop_native(lib, c, _keep) -> None:
    """Stop and join the native copier's thread (a finalizer: _keep holds what the thread reads until then)."""
    lib.pgmoe_copier_stop(ctypes.byref(c))


def _copier_loop(ref) -> None:
    """The copier thread: holds the copier only while it polls (a dropped pool stops it). Any error is
    kept for close() (the GPU's waits then time out instead of hanging)."""
    c = ref()
    try:
        seen = [0]
        if c.cuda:
            torch.cuda.set_device(c.device_index)
            torch.cuda.set_stream(c.stream)  # this thread's current stream, for good
    except BaseException as e:
        c.error = e
        return
    del c
    idle_since = time.perf_counter()
    while True:
        c = ref()
        if c is None or c._stop:
            return
        try:
            busy = c._poll(seen)
        except BaseException as e:
            c.error = e
            return
        idle = not busy and time.perf_counter() - idle_since > c.IDLE_S
        del c
        if busy:
            idle_since = time.perf_counter()
        elif idle:
            time.sleep(DmaCopier.SLEEP_S)
        else:
            _yield_gil()


__all__ = ["CopySettings", "DmaCopier", "ExpertStore", "SlotPool", "OffloadError", "default_budget_bytes",
           "is_expert_param", "GB"]
