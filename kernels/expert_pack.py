"""Lossless compressed expert rows ("exp4"): a packer for bf16 rows and a kernel that expands them on the GPU,
reading the packed rows of a pinned host buffer chosen by expert ids that live on the GPU.

Why: experts live in pinned host memory and cross PCIe at every decode step. bf16 is
sign(1) | exponent(8) | mantissa(7); inside a group of G = 128 consecutive weights the exponents span few
values, so each is stored as a 4-bit code relative to a per-group base, beside one byte of sign + mantissa.
About 75% of the bytes cross the bus and the kernel rebuilds the weights bit for bit. Like
kernels.expert_copy.gather_rows the kernel reads the mapped host memory in place, indexed on the GPU, with
no host synchronisation, so the decode step stays one CUDA graph.

Packed row (uint8, offsets in bytes): K chunks of T elements (T a power of two, 4096 by default; Xg = K T = X
rounded up to a multiple of T, the row padded with +0.0), then the group bases, then the exceptions.
    chunk k at [k CB, (k + 1) CB), CB = 1.5 T (a multiple of 128), for elements [k T, (k + 1) T):
      lo   [0, T)                     (bits >> 8 & 0x80) | (bits & 0x7F): sign in bit 7, mantissa in bits 0..6
      nib  [T, 1.5 T)                 4-bit exponent codes: byte j holds the code of the chunk's element j in its low
                                      nibble, of element j + T/2 in its high nibble
    base [off_base = K CB, +Xg/G)     per group of G: max(largest exponent field - 14, 1)
    cnt  int32 at off_cnt             number of exceptions
    idx  int32[cap] at off_idx        exception element indices, ascending, unused entries 0
    val  int16[cap] at off_val        exception elements' full 16 bits, unused entries 0
    nbytes = off_val + 2 cap rounded up to a multiple of 128, or of 4096 from 1 MiB on (pad bytes 0)
A chunk is one contiguous, 128-byte aligned run of bytes (so is a row in a store of rows; a row of 1 MiB or more is
page-aligned), which a kernel reads in wide loads, each byte once. Alignment matters over PCIe: see
bench/results/probe-expert-pack-h200-chunked.md for the plain copy kernel reading page-aligned rows against rows at
a 16-byte skew.
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
    T: int  # elements per chunk
    K: int  # chunks per row
    CB: int  # bytes per chunk
    cap: int
    off_base: int
    off_cnt: int
    off_idx: int
    off_val: int
    nbytes: int

    @property
    def Xg(self) -> int:
        return self.K * self.T


class PackError(ValueError):
    """A row has more exceptions than its layout's capacity."""


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


CHUNK = 4096  # default elements per chunk (a smaller power of two >= 2 G for rows shorter than that)


def exception_capacity(X: int, cap: int | None) -> int:
    """The exceptions a packed row of X elements has room for (this module's layout and kernels.expert_vlc's):
    cap, or by default max(64, ceil(X / 1024) rounded up to a multiple of 64); ValueError for X < 1 or cap < 0."""
    if X < 1:
        raise ValueError(f"layout: X must be >= 1, got {X}")
    if cap is None:
        cap = max(64, _round_up(math.ceil(X / 1024), 64))
    if cap < 0:
        raise ValueError(f"layout: cap must be >= 0, got {cap}")
    return cap


def layout(X: int, cap: int | None = None, chunk: int | None = None) -> PackedLayout:
    """The packed layout of rows of X bf16 elements with room for `cap` exceptions per row
    (default: max(64, ceil(X / 1024) rounded up to a multiple of 64)) in chunks of `chunk` elements (a power of two
    >= 2 G; default CHUNK, or the smallest power of two >= max(X, 2 G) when that is less)."""
    cap = exception_capacity(X, cap)
    T = chunk if chunk is not None else min(CHUNK, max(2 * G, 1 << (X - 1).bit_length()))
    if T < 2 * G or T & (T - 1):
        raise ValueError(f"layout: chunk must be a power of two >= {2 * G}, got {T}")
    K = -(-X // T)
    CB = T + T // 2
    off_base = K * CB
    off_cnt = _round_up(off_base + K * T // G, 4)
    off_idx = off_cnt + 4
    off_val = off_idx + 4 * cap
    end = off_val + 2 * cap
    nbytes = _round_up(end, 4096 if end >= 1 << 20 else 128)
    return PackedLayout(X=X, T=T, K=K, CB=CB, cap=cap, off_base=off_base, off_cnt=off_cnt, off_idx=off_idx,
                        off_val=off_val, nbytes=nbytes)


def pack_rows(w: torch.Tensor, lay: PackedLayout) -> torch.Tensor:
    """Pack bf16 rows w [N, X] (any device; vectorized torch ops) into uint8 [N, lay.nbytes] on w's device.

    Raises PackError when a row has more exceptions than lay.cap (this syncs with the device once).
    """
    if w.dtype != torch.bfloat16:
        raise ValueError(f"pack_rows: expected a bfloat16 tensor [N, {lay.X}], got {w.dtype}")
    if w.dim() != 2 or w.shape[1] != lay.X:
        raise ValueError(f"pack_rows: expected a bfloat16 tensor [N, {lay.X}] (X = lay.X), "
                         f"got shape {tuple(w.shape)}")
    N, Xg = w.shape[0], lay.Xg
    out_NB = torch.zeros(N, lay.nbytes, dtype=torch.uint8, device=w.device)
    if N == 0:
        return out_NB
    bits_NX = padded_bits(w, Xg)
    lo_NX, base_NG, code_NX, exc_NX = exponent_fields(bits_NX)
    K, T = lay.K, lay.T
    chunks_NKB = out_NB[:, :K * lay.CB].view(N, K, lay.CB)
    chunks_NKB[:, :, :T] = lo_NX.view(N, K, T)
    del lo_NX
    code_NKT = code_NX.to(torch.uint8).view(N, K, T)
    chunks_NKB[:, :, T:T + T // 2] = code_NKT[..., :T // 2] | (code_NKT[..., T // 2:] << 4)
    del code_NKT, code_NX
    out_NB[:, lay.off_base:lay.off_base + Xg // G] = base_NG.to(torch.uint8)
    write_exceptions(out_NB, bits_NX, exc_NX, lay.off_cnt, lay.off_idx, lay.off_val, lay.cap, "pack_rows")
    return out_NB


def padded_bits(w: torch.Tensor, Xg: int) -> torch.Tensor:
    """bf16 rows w [N, X] as int16 bits [N, Xg], padded with +0.0 (bits 0: code 0, never an exception)."""
    bits_NX = w.contiguous().view(torch.int16)
    return torch.nn.functional.pad(bits_NX, (0, Xg - w.shape[1])) if Xg != w.shape[1] else bits_NX


def exponent_fields(bits_NX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """int16 bits [N, Xg] (Xg a multiple of G) -> (lo uint8 [N, Xg]: sign in bit 7, mantissa in bits 0..6;
    base int16 [N, Xg / G]: max(largest exponent field of the group - 14, 1); code int16 [N, Xg]: 4-bit exponent
    codes; exceptions bool [N, Xg]: elements whose exponent lies below their group's window)."""
    N, Xg = bits_NX.shape
    # int16 arithmetic: >> is arithmetic, the masks keep the wanted bits
    lo_NX = (((bits_NX >> 8) & 0x80) | (bits_NX & 0x7F)).to(torch.uint8)
    e_NGk = ((bits_NX >> 7) & 0xFF).view(N, Xg // G, G)  # exponent fields
    base_NG1 = (e_NGk.amax(dim=-1, keepdim=True) - (_WINDOW - 1)).clamp_(min=1)
    code_NX = torch.where(e_NGk >= base_NG1, e_NGk - base_NG1 + 1, 0).view(N, Xg)
    exc_NX = ((e_NGk > 0) & (e_NGk < base_NG1)).view(N, Xg)
    return lo_NX, base_NG1.view(N, Xg // G), code_NX, exc_NX


def write_exceptions(out_NB: torch.Tensor, bits_NX: torch.Tensor, exc_NX: torch.Tensor, off_cnt: int, off_idx: int,
                     off_val: int, cap: int, fn: str, row0: int = 0) -> None:
    """Write each row's exceptions (count int32 at off_cnt, ascending indices int32[cap] at off_idx, their 16 bits
    int16[cap] at off_val) into packed rows out_NB; PackError when a row has more than cap (one device sync), naming
    it as row row0 + its index here."""
    N, dev = out_NB.shape[0], out_NB.device
    count_N = exc_NX.sum(dim=1)
    over = torch.nonzero(count_N > cap)
    if over.numel():
        r = int(over[0, 0])
        raise PackError(f"{fn}: row {row0 + r} has {int(count_N[r])} exceptions (elements whose exponent lies more "
                        f"than {_WINDOW - 1} below the largest of their group of {G}), more than the capacity "
                        f"cap={cap}; pass a larger cap, or do not compress these weights")
    rows_M, cols_M = torch.nonzero(exc_NX).unbind(1)  # row-major: ascending columns within a row
    start_N = torch.cumsum(count_N, 0) - count_N
    rank_M = torch.arange(rows_M.numel(), device=dev) - start_N[rows_M]
    idx_NC = torch.zeros(N, cap, dtype=torch.int32, device=dev)
    val_NC = torch.zeros(N, cap, dtype=torch.int16, device=dev)
    idx_NC[rows_M, rank_M] = cols_M.to(torch.int32)
    val_NC[rows_M, rank_M] = bits_NX[rows_M, cols_M]
    out_NB[:, off_cnt:off_cnt + 4] = count_N.to(torch.int32).view(N, 1).view(torch.uint8)
    out_NB[:, off_idx:off_idx + 4 * cap] = idx_NC.view(torch.uint8)
    out_NB[:, off_val:off_val + 2 * cap] = val_NC.view(torch.uint8)


def _check_packed(fn: str, packed: torch.Tensor, lay: PackedLayout, what: str) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != lay.nbytes:
        raise ValueError(f"{fn}: expected {what} uint8 [*, {lay.nbytes}] (lay.nbytes), "
                         f"got {tuple(packed.shape)} {packed.dtype}")


def unpack_rows_reference(packed: torch.Tensor, lay: PackedLayout) -> torch.Tensor:
    """Plain-torch decoder (any device): packed uint8 [N, nbytes] -> bf16 [N, X]."""
    _check_packed("unpack_rows_reference", packed, lay, "packed rows")
    N, Xg, K, T = packed.shape[0], lay.Xg, lay.K, lay.T
    p = packed[:, :K * lay.CB].view(N, K, lay.CB).to(torch.int32)
    lo_NX = p[:, :, :T].reshape(N, Xg)
    nib = p[:, :, T:T + T // 2]
    code_NX = torch.cat((nib & 15, nib >> 4), dim=2).reshape(N, Xg)
    return assemble_reference(packed, lay, lo_NX, code_NX)


def assemble_reference(packed: torch.Tensor, lay, lo_NX: torch.Tensor, code_NX: torch.Tensor) -> torch.Tensor:
    """bf16 rows [N, X] from their sign-and-mantissa bytes and 4-bit exponent codes [N, Xg] (integers) and the packed
    rows' group bases and exceptions (any layout with off_base, off_cnt, off_idx, off_val, cap, X, Xg: this module's,
    kernels.expert_vlc's)."""
    N, Xg, cap = packed.shape[0], lay.Xg, lay.cap
    base_NX = packed[:, lay.off_base:lay.off_base + Xg // G].to(torch.int32).repeat_interleave(G, dim=1)
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
    def _first_exceptions(src, off_cnt, off_idx, off_val, EXC_CHUNK: tl.constexpr):
        # the row's exception count and its first EXC_CHUNK exceptions (index, 16 bits): loaded before the chunks'
        # expansion, so that their latency overlaps it rather than following the stores
        cnt = tl.load((src + off_cnt).to(tl.pointer_type(tl.int32)))
        k = tl.arange(0, EXC_CHUNK)
        kmask = k < cnt
        idx = tl.load((src + off_idx).to(tl.pointer_type(tl.int32)) + k, mask=kmask, other=0)
        val = tl.load((src + off_val).to(tl.pointer_type(tl.int16)) + k, mask=kmask, other=0)
        return cnt, idx, val

    @triton.jit
    def _apply_exceptions(src, dst16, X, off_idx, off_val, p, cnt, idx0, val0, T: tl.constexpr,
                          NUM_PROGRAMS: tl.constexpr, EXC_CHUNK: tl.constexpr):
        # the row's exceptions that fall in program p's chunks (p, p + P, ...), after its own stores: no
        # cross-program ordering needed. dst16: the destination row as int16. The first EXC_CHUNK come loaded
        # (_first_exceptions); the loop reads the rest.
        tl.debug_barrier()
        k0 = tl.arange(0, EXC_CHUNK)
        mine = (k0 < cnt) & (idx0 < X) & ((idx0 // T) % NUM_PROGRAMS == p)
        tl.store(dst16 + idx0, val0, mask=mine)
        idx_ptr = (src + off_idx).to(tl.pointer_type(tl.int32))
        val_ptr = (src + off_val).to(tl.pointer_type(tl.int16))
        for c in range(EXC_CHUNK, cnt, EXC_CHUNK):
            k = c + tl.arange(0, EXC_CHUNK)
            kmask = k < cnt
            idx = tl.load(idx_ptr + k, mask=kmask, other=0)
            val = tl.load(val_ptr + k, mask=kmask, other=0)
            mine = kmask & (idx < X) & ((idx // T) % NUM_PROGRAMS == p)
            tl.store(dst16 + idx, val, mask=mine)

    @triton.jit
    def _load_chunk(src, off_base, k, K, offs, first, G: tl.constexpr, T: tl.constexpr, CB: tl.constexpr):
        # chunk k's lo bytes of both halves, their code bytes and the group bases of both halves' tile rows (int32;
        # zeros for k >= K, nothing read)
        HALF: tl.constexpr = T // 2
        chunk = src + k * CB
        bases = src + off_base + k * (T // G)
        ok = (offs * 0 + k) < K
        rok = (first * 0 + k) < K
        lo_a = tl.load(chunk + offs, mask=ok, other=0).to(tl.int32)
        lo_b = tl.load(chunk + HALF + offs, mask=ok, other=0).to(tl.int32)
        nib = tl.load(chunk + T + offs, mask=ok, other=0).to(tl.int32)
        base_a = tl.load(bases + first // G, mask=rok, other=0).to(tl.int32)
        base_b = tl.load(bases + (HALF + first) // G, mask=rok, other=0).to(tl.int32)
        return lo_a, lo_b, nib, base_a, base_b

    @triton.jit
    def _expand_chunk(dst, X, k, offs, lo_a, lo_b, nib, base_a, base_b, T: tl.constexpr):
        # chunk k's bf16 bits into dst (int16): the int32 bits' low 16 bits, truncated by the cast
        HALF: tl.constexpr = T // 2
        e0 = k * T
        bits_a = _bf16_bits(lo_a, nib & 15, base_a[:, None])
        bits_b = _bf16_bits(lo_b, nib >> 4, base_b[:, None])
        tl.store(dst + e0 + offs, bits_a.to(tl.int16), mask=e0 + offs < X)
        tl.store(dst + e0 + HALF + offs, bits_b.to(tl.int16), mask=e0 + HALF + offs < X)

    @triton.jit
    def _unpack_rows_kernel(
        src_ptr, ids_ptr, dst_ptr, dst_row_ptr,
        X, K, nbytes, off_base, off_cnt, off_idx, off_val,
        HAS_DST_ROW: tl.constexpr, G: tl.constexpr, T: tl.constexpr, CB: tl.constexpr, COLS: tl.constexpr,
        NUM_PROGRAMS: tl.constexpr, EXC_CHUNK: tl.constexpr, AHEAD: tl.constexpr,
    ):
        # program (i, p) expands chunks p, p + P, p + 2P, ... of packed row ids[i] into dst row dst_row[i] (or i), then
        # applies the exceptions that fall in them (dst is the bf16 destination viewed as int16). A chunk is read as
        # one contiguous run: a tile [T/2 // COLS, COLS] of lo bytes for each half and the code bytes they share; and
        # the chunk's group bases, one per tile row (COLS divides G).
        # (Earlier forms, on a layout whose lo, code and base arrays each spanned the whole row and whose code bytes
        # held elements 2j and 2j + 1: one element per access and two per access read the pinned store at 41.8-44.3
        # GB/s where the plain copy kernel reads 50, and expanded a landed row in 7.8-13.3 us with 1024 programs
        # (probe-expert-pack-h200-chunked.md, "prev"); whole groups interleaved back with tl.join were slower still
        # (probe-expert-pack-h200-groups.md). All in bench/results/.)
        i = tl.program_id(0)
        p = tl.program_id(1)
        row, out_row = _rows_of(ids_ptr, dst_row_ptr, i, HAS_DST_ROW)
        if (row >= 0) & (out_row >= 0):
            src = src_ptr + row * nbytes
            dst = dst_ptr + out_row * X
            HALF: tl.constexpr = T // 2
            cnt, idx0, val0 = _first_exceptions(src, off_cnt, off_idx, off_val, EXC_CHUNK)
            r = tl.arange(0, HALF // COLS)
            first = r * COLS  # each tile row's first element in its half
            offs = first[:, None] + tl.arange(0, COLS)[None, :]
            if AHEAD:  # chunk k + P's loads issued before chunk k's expansion: the next read overlaps this compute
                lo_a, lo_b, nib, base_a, base_b = _load_chunk(src, off_base, p, K, offs, first, G, T, CB)
                for k in range(p, K, NUM_PROGRAMS):
                    n_lo_a, n_lo_b, n_nib, n_base_a, n_base_b = _load_chunk(src, off_base, k + NUM_PROGRAMS, K, offs,
                                                                            first, G, T, CB)
                    _expand_chunk(dst, X, k, offs, lo_a, lo_b, nib, base_a, base_b, T)
                    lo_a, lo_b, nib, base_a, base_b = n_lo_a, n_lo_b, n_nib, n_base_a, n_base_b
            else:
                for k in range(p, K, NUM_PROGRAMS):
                    lo_a, lo_b, nib, base_a, base_b = _load_chunk(src, off_base, k, K, offs, first, G, T, CB)
                    _expand_chunk(dst, X, k, offs, lo_a, lo_b, nib, base_a, base_b, T)
            _apply_exceptions(src, dst, X, off_idx, off_val, p, cnt, idx0, val0, T, NUM_PROGRAMS, EXC_CHUNK)


def unpack_rows_gather_reference(src_EB: torch.Tensor, ids_n: torch.Tensor, dst_SX: torch.Tensor,
                                 lay: PackedLayout, dst_row_n: torch.Tensor | None = None) -> torch.Tensor:
    """dst[dst_row[i]] = unpack(src[ids[i]]) for every i with ids[i] >= 0 and dst_row[i] >= 0 (dst_row None: i)."""
    return gather_reference(unpack_rows_reference, src_EB, ids_n, dst_SX, lay, dst_row_n)


EXC_CHUNK = 512  # exceptions loaded at once (a switch-base expert has ~420, a switch-large one ~820)


def check_unpack_args(src_EB: torch.Tensor, ids_n: torch.Tensor, dst_SX: torch.Tensor, lay, dst_row_n,
                      num_programs: int, exc_chunk: int | None) -> int:
    """unpack_rows' argument checks (this module's and kernels.expert_vlc's: any layout with X and nbytes), raising
    ValueError with the fix; returns exc_chunk (EXC_CHUNK when None)."""
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
    if num_programs < 1:
        raise ValueError(f"unpack_rows: num_programs must be >= 1, got {num_programs}")
    exc_chunk = EXC_CHUNK if exc_chunk is None else exc_chunk
    if exc_chunk < 16 or exc_chunk & (exc_chunk - 1):
        raise ValueError(f"unpack_rows: exc_chunk must be a power of two >= 16, got {exc_chunk}")
    if n and HAVE_TRITON and (dst_SX.is_cuda or _interpreting()):
        if src_EB.device.type == "cpu" and dst_SX.is_cuda and not src_EB.is_pinned():
            raise ValueError("unpack_rows: a host source must be pinned (page-locked) to be read by the GPU")
        if dst_SX.is_cuda and not (ids_n.is_cuda and (dst_row_n is None or dst_row_n.is_cuda)):
            raise ValueError("unpack_rows: ids and dst_row must be on the GPU, beside dst")
    return exc_chunk


def gather_reference(unpack_reference, src_EB: torch.Tensor, ids_n: torch.Tensor, dst_SX: torch.Tensor, lay,
                     dst_row_n: torch.Tensor | None = None) -> torch.Tensor:
    """dst[dst_row[i]] = unpack_reference(src[ids[i]]) for every i with ids[i] >= 0 and dst_row[i] >= 0 (dst_row
    None: i)."""
    ids = ids_n.long().cpu()
    rows = torch.arange(len(ids)) if dst_row_n is None else dst_row_n.long().cpu()
    for e, r in zip(ids.tolist(), rows.tolist()):
        if e >= 0 and r >= 0:
            dst_SX[r].copy_(unpack_reference(src_EB[e:e + 1], lay)[0])
    return dst_SX


def unpack_rows(src_EB: torch.Tensor, ids_n: torch.Tensor, dst_SX: torch.Tensor, lay: PackedLayout,
                dst_row_n: torch.Tensor | None = None, num_programs: int = 16, num_warps: int = 4,
                ahead: bool = True, exc_chunk: int | None = None) -> torch.Tensor:
    """Expand packed rows of `src` (pinned host memory, or device memory) chosen by `ids` (on the GPU) into rows
    of `dst` (on the GPU), without a host synchronisation:
    dst[dst_row[i]] = unpack(src[ids[i]]) for every i with ids[i] >= 0 and dst_row[i] >= 0 (dst_row None: i).

    src [E, lay.nbytes] uint8 and dst [S, lay.X] bf16 must be contiguous; ids and dst_row are int32/int64 [n].
    A grid of n x num_programs programs; each iteration of a program expands one chunk (lay.T elements), with the
    next chunk's loads issued before it when `ahead`. Each program loads the row's first exc_chunk exceptions (a
    power of two; default EXC_CHUNK) before its chunks, the rest after them.
    """
    exc_chunk = check_unpack_args(src_EB, ids_n, dst_SX, lay, dst_row_n, num_programs, exc_chunk)
    if ids_n.numel() == 0:
        return dst_SX
    if not HAVE_TRITON or not (dst_SX.is_cuda or _interpreting()):
        return unpack_rows_gather_reference(src_EB, ids_n, dst_SX, lay, dst_row_n)
    n = ids_n.numel()
    num_programs = min(num_programs, lay.K)  # a program past the row's chunks would have nothing to do
    _unpack_rows_kernel[(n, num_programs)](
        src_EB, ids_n, dst_SX.view(torch.int16), dst_row_n if dst_row_n is not None else ids_n,
        lay.X, lay.K, lay.nbytes, lay.off_base, lay.off_cnt, lay.off_idx, lay.off_val,
        HAS_DST_ROW=dst_row_n is not None, G=G, T=lay.T, CB=lay.CB, COLS=min(G, lay.T // 2), NUM_PROGRAMS=num_programs,
        EXC_CHUNK=exc_chunk, AHEAD=ahead, num_warps=num_warps,
    )
    return dst_SX


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
