"""Lossless compressed expert rows ("exp4"): a packer for bf16 rows and a kernel that expands them on the GPU,
reading the packed rows of a pinned host buffer chosen by expert ids that live on the GPU.

Why: experts live in pinned host memory and cross PCIe at every decode step. bf16 is
sign(1) | exponent(8) | mantissa(7); inside a group of G = 128 consecutive weights the exponents span few
values, so each is stored as a 4-bit code relative to a per-group base, beside one byte of sign + mantissa.
About 75% of the bytes cross the bus and the kernel rebuilds the weights bit for bit. Like
kernels.expert_copy.gather_rows the kernel reads the mapped host memory in place, indexed on the GPU, with
no host synchronisation, so the decode step stays one CUDA graph.

Packed row (uint8, offsets in bytes; Xg = X rounded up to a multiple of G, the row padded with +0.0):
    lo   [0, Xg)                      (bits >> 8 & 0x80) | (bits & 0x7F): sign in bit 7, mantissa in bits 0..6
    nib  [off_nib, +Xg/2)             4-bit exponent codes, element 2j in the low nibble of byte j, 2j+1 high
    base [off_base, +Xg/G)            per group: max(largest exponent field - 14, 1)
    cnt  int32 at off_cnt             number of exceptions (off_cnt: a multiple of 4)
    idx  int32[cap] at off_idx        exception element indices, ascending, unused entries 0
    val  int16[cap] at off_val        exception elements' full 16 bits, unused entries 0
    nbytes = off_val + 2 cap rounded up to a multiple of 16 (pad bytes 0)
Codes (e = the exponent field): e - base + 1 (1..15) when e >= base; 0 when e == 0 (zero, subnormals: exact);
0 with the element in the exception list when 0 < e < base. Decoding: exp = 0 if code == 0 else base + code - 1,
then every exception overwrites its element. inf / nan are exact: exponent 255 lies in its group's window.

Legend: E rows in the store (experts), X bf16 elements per row, B = nbytes packed bytes per row, n ids,
S rows in the destination (slots), N rows packed at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

G = 128  # elements per exponent group
_WINDOW = 15  # exponents a 4-bit code reaches above the base (codes 1..15)


@dataclass(frozen=True)
class PackedLayout:
    """Byte offsets of one packed row of X bf16 elements (see the module docstring)."""

    X: int
    Xg: int
    cap: int
    off_nib: int
    off_base: int
    off_cnt: int
    off_idx: int
    off_val: int
    nbytes: int


class PackError(ValueError):
    """A row has more exceptions than its layout's capacity."""


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def layout(X: int, cap: int | None = None) -> PackedLayout:
    """The packed layout of rows of X bf16 elements with room for `cap` exceptions per row
    (default: max(64, ceil(X / 1024) rounded up to a multiple of 64))."""
    if X < 1:
        raise ValueError(f"layout: X must be >= 1, got {X}")
    if cap is None:
        cap = max(64, _round_up(math.ceil(X / 1024), 64))
    if cap < 0:
        raise ValueError(f"layout: cap must be >= 0, got {cap}")
    Xg = _round_up(X, G)
    off_nib = Xg
    off_base = off_nib + Xg // 2
    off_cnt = _round_up(off_base + Xg // G, 4)
    off_idx = off_cnt + 4
    off_val = off_idx + 4 * cap
    nbytes = _round_up(off_val + 2 * cap, 16)
    return PackedLayout(X=X, Xg=Xg, cap=cap, off_nib=off_nib, off_base=off_base, off_cnt=off_cnt,
                        off_idx=off_idx, off_val=off_val, nbytes=nbytes)


def pack_rows(w: torch.Tensor, lay: PackedLayout) -> torch.Tensor:
    """Pack bf16 rows w [N, X] (any device; vectorized torch ops) into uint8 [N, lay.nbytes] on w's device.

    Raises PackError when a row has more exceptions than lay.cap (this syncs with the device once).
    """
    if w.dtype != torch.bfloat16:
        raise ValueError(f"pack_rows: expected a bfloat16 tensor [N, {lay.X}], got {w.dtype}")
    if w.dim() != 2 or w.shape[1] != lay.X:
        raise ValueError(f"pack_rows: expected a bfloat16 tensor [N, {lay.X}] (X = lay.X), "
                         f"got shape {tuple(w.shape)}")
    N, X, Xg, cap = w.shape[0], lay.X, lay.Xg, lay.cap
    dev = w.device
    out_NB = torch.zeros(N, lay.nbytes, dtype=torch.uint8, device=dev)
    if N == 0:
        return out_NB
    bits_NX = w.contiguous().view(torch.int16)
    if Xg != X:  # pad with +0.0 (bits 0): code 0, never an exception
        bits_NX = torch.nn.functional.pad(bits_NX, (0, Xg - X))
    # int16 arithmetic: >> is arithmetic, the masks keep the wanted bits
    out_NB[:, :Xg] = (((bits_NX >> 8) & 0x80) | (bits_NX & 0x7F)).to(torch.uint8)
    e_NGk = ((bits_NX >> 7) & 0xFF).view(N, Xg // G, G)  # exponent fields, int16
    base_NG1 = (e_NGk.amax(dim=-1, keepdim=True) - (_WINDOW - 1)).clamp_(min=1)
    code_NGk = torch.where(e_NGk >= base_NG1, e_NGk - base_NG1 + 1, 0).to(torch.uint8).view(N, Xg)
    out_NB[:, lay.off_nib:lay.off_nib + Xg // 2] = code_NGk[:, 0::2] | (code_NGk[:, 1::2] << 4)
    del code_NGk
    out_NB[:, lay.off_base:lay.off_base + Xg // G] = base_NG1.view(N, Xg // G).to(torch.uint8)
    exc_NX = ((e_NGk > 0) & (e_NGk < base_NG1)).view(N, Xg)
    del e_NGk
    count_N = exc_NX.sum(dim=1)
    over = torch.nonzero(count_N > cap)
    if over.numel():
        r = int(over[0, 0])
        raise PackError(f"pack_rows: row {r} has {int(count_N[r])} exceptions (elements whose exponent lies more "
                        f"than {_WINDOW - 1} below the largest of their group of {G}), more than the capacity "
                        f"cap={cap}; pass a larger cap, or do not compress these weights")
    rows_M, cols_M = torch.nonzero(exc_NX).unbind(1)  # row-major: ascending columns within a row
    del exc_NX
    start_N = torch.cumsum(count_N, 0) - count_N
    rank_M = torch.arange(rows_M.numel(), device=dev) - start_N[rows_M]
    idx_NC = torch.zeros(N, cap, dtype=torch.int32, device=dev)
    val_NC = torch.zeros(N, cap, dtype=torch.int16, device=dev)
    idx_NC[rows_M, rank_M] = cols_M.to(torch.int32)
    val_NC[rows_M, rank_M] = bits_NX[rows_M, cols_M]
    out_NB[:, lay.off_cnt:lay.off_cnt + 4] = count_N.to(torch.int32).view(N, 1).view(torch.uint8)
    out_NB[:, lay.off_idx:lay.off_idx + 4 * cap] = idx_NC.view(torch.uint8)
    out_NB[:, lay.off_val:lay.off_val + 2 * cap] = val_NC.view(torch.uint8)
    return out_NB


def _check_packed(fn: str, packed: torch.Tensor, lay: PackedLayout, what: str) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != lay.nbytes:
        raise ValueError(f"{fn}: expected {what} uint8 [*, {lay.nbytes}] (lay.nbytes), "
                         f"got {tuple(packed.shape)} {packed.dtype}")


def unpack_rows_reference(packed: torch.Tensor, lay: PackedLayout) -> torch.Tensor:
    """Plain-torch decoder (any device): packed uint8 [N, nbytes] -> bf16 [N, X]."""
    _check_packed("unpack_rows_reference", packed, lay, "packed rows")
    N, Xg, cap = packed.shape[0], lay.Xg, lay.cap
    p = packed.to(torch.int32)
    lo_NX = p[:, :Xg]
    nib = p[:, lay.off_nib:lay.off_nib + Xg // 2]
    code_NX = torch.stack((nib & 15, nib >> 4), dim=-1).reshape(N, Xg)
    base_NX = p[:, lay.off_base:lay.off_base + Xg // G].repeat_interleave(G, dim=1)
    exp_NX = torch.where(code_NX == 0, 0, base_NX + code_NX - 1)
    bits_NX = ((lo_NX & 0x80) << 8) | (exp_NX << 7) | (lo_NX & 0x7F)
    bits_NX = torch.where(bits_NX >= 32768, bits_NX - 65536, bits_NX).to(torch.int16)
    cnt_N1 = packed[:, lay.off_cnt:lay.off_cnt + 4].contiguous().view(torch.int32)
    idx_NC = packed[:, lay.off_idx:lay.off_idx + 4 * cap].contiguous().view(torch.int32).long()
    val_NC = packed[:, lay.off_val:lay.off_val + 2 * cap].contiguous().view(torch.int16)
    valid_NC = torch.arange(cap, device=packed.device) < cnt_N1
    rows_NC = torch.arange(N, device=packed.device)[:, None].expand(N, cap)
    bits_NX[rows_NC[valid_NC], idx_NC[valid_NC]] = val_NC[valid_NC]
    return bits_NX[:, :lay.X].contiguous().view(torch.bfloat16)


if HAVE_TRITON:

    @triton.jit
    def _rows_of(ids_ptr, dst_row_ptr, i, HAS_DST_ROW: tl.constexpr):
        # (packed row ids[i], destination row dst_row[i] or i), int64; a negative one means "nothing to expand"
        row = tl.load(ids_ptr + i).to(tl.int64)
        if HAS_DST_ROW:
            out_row = tl.load(dst_row_ptr + i).to(tl.int64)
        else:
            out_row = i.to(tl.int64)
        return row, out_row

    @triton.jit
    def _bf16_bits(lo, code, base):
        # the 16 bits (0..65535, int32) of a weight from its sign-and-mantissa byte, its 4-bit code and its group's base
        exp = tl.where(code == 0, 0, base + code - 1)
        return ((lo & 0x80) << 8) | (exp << 7) | (lo & 0x7F)

    @triton.jit
    def _apply_exceptions(src, dst16, X, off_cnt, off_idx, off_val, p, BLOCK: tl.constexpr,
                          NUM_PROGRAMS: tl.constexpr, EXC_CHUNK: tl.constexpr):
        # the row's exceptions that fall in program p's blocks of BLOCK elements (blocks p, p + P, ...), after its own
        # stores: no cross-program ordering needed. dst16: the destination row as int16.
        tl.debug_barrier()
        cnt = tl.load((src + off_cnt).to(tl.pointer_type(tl.int32)))
        idx_ptr = (src + off_idx).to(tl.pointer_type(tl.int32))
        val_ptr = (src + off_val).to(tl.pointer_type(tl.int16))
        for c in range(0, cnt, EXC_CHUNK):
            k = c + tl.arange(0, EXC_CHUNK)
            kmask = k < cnt
            idx = tl.load(idx_ptr + k, mask=kmask, other=0)
            val = tl.load(val_ptr + k, mask=kmask, other=0)
            mine = kmask & (idx < X) & ((idx // BLOCK) % NUM_PROGRAMS == p)
            tl.store(dst16 + idx, val, mask=mine)

    @triton.jit
    def _unpack_rows_kernel(
        src_ptr, ids_ptr, dst_ptr, dst_row_ptr,
        X, nbytes, off_nib, off_base, off_cnt, off_idx, off_val,
        HAS_DST_ROW: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
        EXC_CHUNK: tl.constexpr,
    ):
        # program (i, p) expands blocks p, p + P, p + 2P, ... of packed row ids[i] into dst row dst_row[i] (or i),
        # then applies the exceptions that fall in those blocks (dst is the bf16 destination viewed as int16).
        # (A form working on whole groups, the nibble bytes loaded once and their two codes interleaved back with
        # tl.join, was slower on the H200: 20.7 vs 15.0 us per switch-base expert from GPU memory, 31.8 vs 42.8 GB/s
        # from the pinned store; bench/results/probe-expert-pack-h200-groups.md.)
        i = tl.program_id(0)
        p = tl.program_id(1)
        row, out_row = _rows_of(ids_ptr, dst_row_ptr, i, HAS_DST_ROW)
        if (row >= 0) & (out_row >= 0):
            src = src_ptr + row * nbytes
            dst = dst_ptr + out_row * X
            for start in range(p * BLOCK, X, NUM_PROGRAMS * BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < X
                lo = tl.load(src + offs, mask=mask, other=0).to(tl.int32)
                nib = tl.load(src + off_nib + offs // 2, mask=mask, other=0).to(tl.int32)
                code = (nib >> ((offs & 1) * 4)) & 15
                base = tl.load(src + off_base + offs // G, mask=mask, other=0).to(tl.int32)
                bits = _bf16_bits(lo, code, base)
                bits = tl.where(bits >= 32768, bits - 65536, bits)  # the int16 of the same 16 bits
                tl.store(dst + offs, bits.to(tl.int16), mask=mask)
            _apply_exceptions(src, dst, X, off_cnt, off_idx, off_val, p, BLOCK, NUM_PROGRAMS, EXC_CHUNK)

    @triton.jit
    def _unpack_pairs_kernel(
        src_ptr, ids_ptr, dst_ptr, dst_row_ptr,
        X, nbytes, off_nib, off_base, off_cnt, off_idx, off_val,
        HAS_DST_ROW: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
        EXC_CHUNK: tl.constexpr,
    ):
        # The same expansion two elements at a time (X even): pair q is elements 2q and 2q + 1, whose lo bytes are one
        # 16-bit load, whose codes are one nibble byte, and whose bf16 bits are one 32-bit store. Every access is
        # contiguous in q, with no byte loaded twice. BLOCK counts elements (BLOCK // 2 pairs per iteration); dst is
        # the destination viewed as int32 (X // 2 words a row).
        i = tl.program_id(0)
        p = tl.program_id(1)
        row, out_row = _rows_of(ids_ptr, dst_row_ptr, i, HAS_DST_ROW)
        if (row >= 0) & (out_row >= 0):
            src = src_ptr + row * nbytes
            lo_ptr = src.to(tl.pointer_type(tl.int16))
            XP = X // 2
            dst = dst_ptr + out_row * XP
            for start in range(p * (BLOCK // 2), XP, NUM_PROGRAMS * (BLOCK // 2)):
                q = start + tl.arange(0, BLOCK // 2)
                mask = q < XP
                lo2 = tl.load(lo_ptr + q, mask=mask, other=0).to(tl.int32)  # lo[2q] | lo[2q + 1] << 8
                nib = tl.load(src + off_nib + q, mask=mask, other=0).to(tl.int32)
                base = tl.load(src + off_base + (2 * q) // G, mask=mask, other=0).to(tl.int32)
                bits_a = _bf16_bits(lo2 & 0xFF, nib & 15, base)
                bits_b = _bf16_bits((lo2 >> 8) & 0xFF, (nib >> 4) & 15, base)
                word = bits_a.to(tl.int64) | (bits_b.to(tl.int64) << 16)  # element 2q in the low half
                word = tl.where(word >= 2147483648, word - 4294967296, word)  # the int32 of the same 32 bits
                tl.store(dst + q, word.to(tl.int32), mask=mask)
            _apply_exceptions(src, dst.to(tl.pointer_type(tl.int16)), X, off_cnt, off_idx, off_val, p, BLOCK,
                              NUM_PROGRAMS, EXC_CHUNK)


def unpack_rows_gather_reference(src_EB: torch.Tensor, ids_n: torch.Tensor, dst_SX: torch.Tensor,
                                 lay: PackedLayout, dst_row_n: torch.Tensor | None = None) -> torch.Tensor:
    """dst[dst_row[i]] = unpack(src[ids[i]]) for every i with ids[i] >= 0 and dst_row[i] >= 0 (dst_row None: i)."""
    ids = ids_n.long().cpu()
    rows = torch.arange(len(ids)) if dst_row_n is None else dst_row_n.long().cpu()
    for e, r in zip(ids.tolist(), rows.tolist()):
        if e >= 0 and r >= 0:
            dst_SX[r].copy_(unpack_rows_reference(src_EB[e:e + 1], lay)[0])
    return dst_SX


def unpack_rows(src_EB: torch.Tensor, ids_n: torch.Tensor, dst_SX: torch.Tensor, lay: PackedLayout,
                dst_row_n: torch.Tensor | None = None, num_programs: int = 16, block: int = 4096,
                num_warps: int = 4, pairs: bool = False) -> torch.Tensor:
    """Expand packed rows of `src` (pinned host memory, or device memory) chosen by `ids` (on the GPU) into rows
    of `dst` (on the GPU), without a host synchronisation:
    dst[dst_row[i]] = unpack(src[ids[i]]) for every i with ids[i] >= 0 and dst_row[i] >= 0 (dst_row None: i).

    src [E, lay.nbytes] uint8 and dst [S, lay.X] bf16 must be contiguous; ids and dst_row are int32/int64 [n].
    pairs: the kernel that expands two elements per access (_unpack_pairs_kernel; X even, block >= 2); not measured
    on a GPU yet, so not the default (scripts/probe_expert_pack.py times both).
    """
    _check_packed("unpack_rows", src_EB, lay, "src")
    if dst_SX.dtype != torch.bfloat16 or dst_SX.dim() != 2 or dst_SX.shape[1] != lay.X:
        raise ValueError(f"unpack_rows: expected dst bfloat16 [S, {lay.X}] (lay.X), "
                         f"got {tuple(dst_SX.shape)} {dst_SX.dtype}")
    if not (src_EB.is_contiguous() and dst_SX.is_contiguous()):
        raise ValueError("unpack_rows: src and dst must be contiguous")
    n = ids_n.numel()
    for name, t in (("ids", ids_n), ("dst_row", dst_row_n)):
        if t is not None and (t.dtype not in (torch.int32, torch.int64) or t.dim() != 1 or t.numel() != n):
            raise ValueError(f"unpack_rows: {name} must be int32/int64 [n] with n = {n}, "
                             f"got {tuple(t.shape)} {t.dtype}")
    if block < 1 or block & (block - 1) or num_programs < 1:
        raise ValueError(f"unpack_rows: block must be a power of two and num_programs >= 1, "
                         f"got block={block}, num_programs={num_programs}")
    if n == 0:
        return dst_SX
    if not HAVE_TRITON or not (dst_SX.is_cuda or _interpreting()):
        return unpack_rows_gather_reference(src_EB, ids_n, dst_SX, lay, dst_row_n)
    if src_EB.device.type == "cpu" and dst_SX.is_cuda and not src_EB.is_pinned():
        raise ValueError("unpack_rows: a host source must be pinned (page-locked) to be read by the GPU")
    if dst_SX.is_cuda and not (ids_n.is_cuda and (dst_row_n is None or dst_row_n.is_cuda)):
        raise ValueError("unpack_rows: ids and dst_row must be on the GPU, beside dst")
    if pairs and lay.X % 2 == 0 and block >= 2:
        _unpack_pairs_kernel[(n, num_programs)](
            src_EB, ids_n, dst_SX.view(torch.int32), dst_row_n if dst_row_n is not None else ids_n,
            lay.X, lay.nbytes, lay.off_nib, lay.off_base, lay.off_cnt, lay.off_idx, lay.off_val,
            HAS_DST_ROW=dst_row_n is not None, G=G, BLOCK=block, NUM_PROGRAMS=num_programs, EXC_CHUNK=128,
            num_warps=num_warps,
        )
        return dst_SX
    _unpack_rows_kernel[(n, num_programs)](
        src_EB, ids_n, dst_SX.view(torch.int16), dst_row_n if dst_row_n is not None else ids_n,
        lay.X, lay.nbytes, lay.off_nib, lay.off_base, lay.off_cnt, lay.off_idx, lay.off_val,
        HAS_DST_ROW=dst_row_n is not None, G=G, BLOCK=block, NUM_PROGRAMS=num_programs, EXC_CHUNK=128,
        num_warps=num_warps,
    )
    return dst_SX


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
