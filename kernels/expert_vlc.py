"""Lossless expert rows with a variable-length exponent code ("expv"): a packer for bf16 rows and a kernel that
expands them on the GPU, from packed rows chosen by expert ids that live on the GPU (no host synchronisation).

Why: exp4 (kernels/expert_pack.py) spends 4 bits on every weight's exponent code (its exponent against a base per
group of G = 128 weights). Those codes are far from uniform: in experts drawn like the benchmark's, and in the
shipped checkpoint, the three commonest carry ~75% of the weights and the rest fall off by about half per binade
(their entropy is 2.54-2.57 bits: bench/results/probe-exponent-entropy.md). expv keeps exp4's byte of sign and
mantissa, its group bases and its exceptions, and codes each 4-bit code by its rank r in the row's own frequency
order, in levels of fixed-width fields:
    level 1, every weight               2 bits   r (r < 3), or 3: go on
    level 2, the weights that went on   2 bits   r - 3 (r < 6), or 3: go on
    level 3, the weights that went on   2 bits   r - 6 (r < 9), or 3: go on
    level 4, the weights that went on   4 bits   r - 9
Every field is found without reading the ones before it: a weight's field at level l + 1 is at its rank among the
tile's weights that went on at level l, an exclusive prefix sum a GPU computes for a whole tile at once. On normal
weights a packed row is 0.886-0.889 of exp4's bytes, 67% of bf16's (bench/results/probe-expert-vlc-h200.md).
The kernel gives each group of 16 elements of a tile (strided by T / 16, so that a step of the groups reads and
writes T / 16 consecutive elements) to one lane: a group's fields of one level are contiguous, its counts come from
popcounts of its fields, and prefix sums over the T / 16 groups place them.

Packed row (uint8, offsets in bytes; tiles of T elements, T a power of two >= G; Xg = K T = X rounded up to a
multiple of T, the row padded with +0.0):
    lo     [0, Xg)                (bits >> 8 & 0x80) | (bits & 0x7F): sign in bit 7, mantissa in bits 0..6
    base   [off_base, +Xg/G)      per group of G: max(largest exponent field - 14, 1), as exp4
    perm   int64 at off_perm      nibble r (bits 4r..4r+3) = the 4-bit code of rank r
    tile   uint32[K] at off_tile  the 32-bit word where tile k's fields start, from off_stream
    cnt    int32 at off_cnt       number of exceptions (as exp4)
    idx    int32[cap] at off_idx  exception element indices, ascending, unused entries 0
    val    int16[cap] at off_val  exception elements' full 16 bits, unused entries 0
    stream at off_stream          per tile, in bits from its first word (bit b in byte b >> 3 at b & 7), its
                                  elements in field order (group g = elements g, g + T/16, .., g + 15 T/16; groups
                                  in turn): level 1's fields at 2 j (j-th element in field order: group g's in word
                                  g); level 2's n2 at 2 T + 2 i (the tile's i-th weight that went on); level 3's n3
                                  at 2 T + 2 n2 + 2 i; level 4's at A + 4 i, A = 2 T + 2 n2 + 2 n3 rounded up to a
                                  multiple of 4; two guard words after the last tile; the next tile at the next word
    nbytes = off_stream + 4 W rounded up to a multiple of 128, or of 4096 from 1 MiB on (pad bytes 0)
The stream comes last and a row's codes fill a prefix of it: a store whose rows are this layout's nbytes apart only
needs to copy each row's first `used` bytes (pack_rows returns them; the largest over a store is what a copy moves).
Codes (e = the exponent field) and exceptions as exp4: e - base + 1 (1..15) when e >= base; 0 when e == 0 (zero,
subnormals: exact); 0 with the element in the exception list when 0 < e < base. inf / nan are exact.

Legend: E rows in the store (experts), X bf16 elements per row, B = nbytes packed bytes per row, n ids,
S rows in the destination (slots), N rows packed at once, K tiles per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.expert_pack import (
    G,
    PackError,
    _check_packed,
    _interpreting,
    _round_up,
    assemble_reference,
    check_unpack_args,
    exception_capacity,
    exponent_fields,
    gather_reference,
    padded_bits,
    write_exceptions,
)

try:
    import triton
    import triton.language as tl

    from kernels.expert_pack import _apply_exceptions, _bf16_bits, _first_exceptions, _rows_of

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

TILE = 4096  # elements per tile (default)
STREAM_BITS = 4.0  # stream capacity per weight of the default layout (exp4's exponent bits: rows as large as exp4's)
LEVELS = ((0, 2), (3, 2), (6, 2), (9, 4))  # (first rank, field bits) of each level


@dataclass(frozen=True)
class VlcLayout:
    """Byte offsets of one packed row of X bf16 elements (see the module docstring)."""

    X: int
    T: int  # elements per tile
    K: int  # tiles per row
    cap: int
    off_base: int
    off_perm: int
    off_tile: int
    off_cnt: int
    off_idx: int
    off_val: int
    off_stream: int
    words: int  # stream capacity in uint32 words
    nbytes: int

    @property
    def Xg(self) -> int:
        return self.K * self.T

    def used_bytes(self, words_used: int) -> int:
        """Bytes of a row whose stream fills words_used words (its guard words included): the prefix a copy must
        move."""
        end = self.off_stream + 4 * words_used
        return min(self.nbytes, _round_up(end, 4096 if self.nbytes >= 1 << 20 else 128))


def layout(X: int, cap: int | None = None, tile: int | None = None,
           stream_bits: float = STREAM_BITS) -> VlcLayout:
    """The packed layout of rows of X bf16 elements, with room for `cap` exceptions per row (default as exp4's:
    max(64, ceil(X / 1024) rounded up to a multiple of 64)), tiles of `tile` elements (a power of two >= G; default
    TILE, or the smallest power of two >= max(X, G) when that is less) and a stream of stream_bits bits per weight (a
    row whose codes need more does not pack: PackError)."""
    cap = exception_capacity(X, cap)
    T = tile if tile is not None else min(TILE, max(G, 1 << (X - 1).bit_length()))
    if T < G or T & (T - 1):
        raise ValueError(f"layout: tile must be a power of two >= {G}, got {T}")
    if not stream_bits > 0:
        raise ValueError(f"layout: stream_bits must be > 0, got {stream_bits}")
    K = -(-X // T)
    Xg = K * T
    off_base = Xg
    off_perm = _round_up(off_base + Xg // G, 8)
    off_tile = off_perm + 8
    off_cnt = off_tile + 4 * K
    off_idx = off_cnt + 4
    off_val = off_idx + 4 * cap
    off_stream = _round_up(off_val + 2 * cap, 128)
    end = off_stream + 4 * math.ceil(Xg * stream_bits / 32)
    nbytes = _round_up(end, 4096 if end >= 1 << 20 else 128)
    return VlcLayout(X=X, T=T, K=K, cap=cap, off_base=off_base, off_perm=off_perm, off_tile=off_tile,
                     off_cnt=off_cnt, off_idx=off_idx, off_val=off_val, off_stream=off_stream,
                     words=(nbytes - off_stream) // 4, nbytes=nbytes)


def code_bits(counts: torch.Tensor) -> int:
    """Bits of the level fields for codes with these counts per rank (int [16], most frequent first)."""
    c = [int(x) for x in counts.tolist()]
    return sum(w * sum(c[r:]) for r, w in LEVELS)


def _field_order(v_KT: torch.Tensor) -> torch.Tensor:
    """Elements [K, T] in the order of the tile's fields: group g (lane g of the kernel) = elements g, g + T/16, ..,
    g + 15 T/16 of the tile, groups in turn."""
    K, T = v_KT.shape
    return v_KT.view(K, 16, T // 16).transpose(1, 2).reshape(K, T)


def _natural_order(v_KT: torch.Tensor) -> torch.Tensor:
    """The inverse of _field_order."""
    K, T = v_KT.shape
    return v_KT.view(K, T // 16, 16).transpose(1, 2).reshape(K, T)


def _exclusive_cumsum(flags_KT: torch.Tensor) -> torch.Tensor:
    c = torch.cumsum(flags_KT.long(), dim=1)
    return c - flags_KT.long()


def pack_rows(w: torch.Tensor, lay: VlcLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack bf16 rows w [N, X] (any device; vectorized torch ops, a row at a time) into uint8 [N, lay.nbytes] on
    w's device; also returns each row's used bytes (int64 [N], on the CPU: the prefix a copy must move).

    Raises PackError when a row has more exceptions than lay.cap, or more code bits than its stream holds.
    """
    if w.dtype != torch.bfloat16:
        raise ValueError(f"pack_rows: expected a bfloat16 tensor [N, {lay.X}], got {w.dtype}")
    if w.dim() != 2 or w.shape[1] != lay.X:
        raise ValueError(f"pack_rows: expected a bfloat16 tensor [N, {lay.X}] (X = lay.X), "
                         f"got shape {tuple(w.shape)}")
    N, Xg, K, T, dev = w.shape[0], lay.Xg, lay.K, lay.T, w.device
    out_NB = torch.zeros(N, lay.nbytes, dtype=torch.uint8, device=dev)
    used = torch.zeros(N, dtype=torch.int64)
    if N == 0:
        return out_NB, used
    nib = torch.arange(16, device=dev)
    for r in range(N):  # a row at a time: the stream's temporaries are ~50 bytes per weight
        bits_X = padded_bits(w[r:r + 1], Xg)
        lo_X, base_G, code_X, exc_X = exponent_fields(bits_X)
        row = out_NB[r]
        row[:Xg] = lo_X[0]
        row[lay.off_base:lay.off_base + Xg // G] = base_G[0].to(torch.uint8)
        write_exceptions(out_NB[r:r + 1], bits_X, exc_X, lay.off_cnt, lay.off_idx, lay.off_val, lay.cap,
                         "pack_rows", row0=r)
        del lo_X, base_G, exc_X
        code_X = code_X[0].long()
        counts = torch.bincount(code_X, minlength=16)
        order = torch.sort(counts, descending=True, stable=True).indices  # rank -> code (ties: the lower code)
        rank_of = torch.empty(16, dtype=torch.int64, device=dev)
        rank_of[order] = nib
        row[lay.off_perm:lay.off_perm + 8] = (order << (4 * nib)).sum().view(1).view(torch.uint8)
        rank_KT = _field_order(rank_of[code_X].view(K, T))
        del code_X
        # each level's fields: (value, tile, bit position within the tile) of the weights that reach it
        went = torch.ones_like(rank_KT, dtype=torch.bool)
        tile_of = torch.arange(K, device=dev)[:, None].expand(K, T)
        fields = []
        at = torch.zeros(K, dtype=torch.int64, device=dev)  # where the level starts, bits from the tile's start
        for first, width in LEVELS:
            if width == 4:
                at = _round_up(at, 4)
            val = (rank_KT - first).clamp(max=(1 << width) - 1)
            fields.append((val[went], tile_of[went], (at[:, None] + width * _exclusive_cumsum(went))[went]))
            at = at + width * went.sum(dim=1)
            went = went & (rank_KT >= first + 3)
        del rank_KT, went, tile_of
        tile_words = (at + 31) // 32
        tile_word0 = torch.cumsum(tile_words, 0) - tile_words
        words_used = int(tile_words.sum()) + 2  # guard words: the kernel reads up to two words past a level's fields
        if words_used > lay.words:
            raise PackError(f"pack_rows: row {r} needs {32 * words_used} bits of exponent codes "
                            f"({32 * words_used / lay.X:.2f} per weight), more than its layout's stream holds "
                            f"({32 * lay.words} bits); pass a larger stream_bits to layout(), or use exp4")
        row[lay.off_tile:lay.off_tile + 4 * K] = _as_bytes(tile_word0, torch.int32)
        acc = torch.zeros(4 * words_used, dtype=torch.int32, device=dev)  # the stream's bytes
        for val, tile, pos in fields:  # no field straddles a byte (2-bit fields at even bits, 4-bit at multiples of 4)
            pos = pos + 32 * tile_word0[tile]
            acc.index_add_(0, pos >> 3, (val << (pos & 7)).to(torch.int32))  # disjoint bits: a sum is their OR
        del fields
        row[lay.off_stream:lay.off_stream + acc.numel()] = acc.to(torch.uint8)
        used[r] = lay.used_bytes(words_used)
        del acc
    return out_NB, used


def _as_bytes(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t [n] as dtype, in fresh memory (a one-element view may keep a stride that a byte view refuses), as bytes."""
    return torch.empty(t.numel(), dtype=dtype, device=t.device).copy_(t.reshape(-1)).view(torch.uint8)


def _field(packed_NB: torch.Tensor, off: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    return packed_NB[:, off:off + size * count].contiguous().view(dtype)


def decode_codes_reference(packed: torch.Tensor, lay: VlcLayout) -> torch.Tensor:
    """Plain-torch decoder of the exponent codes (any device): packed uint8 [N, nbytes] -> int64 [N, Xg], a whole
    row's tiles at once, level by level, as the kernel does a tile."""
    _check_packed("decode_codes_reference", packed, lay, "packed rows")
    N, K, T, dev = packed.shape[0], lay.K, lay.T, packed.device
    out = torch.empty(N, lay.Xg, dtype=torch.int64, device=dev)
    j = torch.arange(T, device=dev)
    for r in range(N):
        row = packed[r:r + 1]
        perm = _field(row, lay.off_perm, 1, torch.int64)[0, 0]
        perm_t = (perm >> (4 * torch.arange(16, device=dev))) & 15
        stream = row[0, lay.off_stream:].long()
        tile_bit = 32 * (_field(row, lay.off_tile, K, torch.int32)[0].long() & 0xFFFFFFFF)  # [K]
        rank = torch.zeros(K, T, dtype=torch.int64, device=dev)
        went = torch.ones(K, T, dtype=torch.bool, device=dev)
        at = torch.zeros(K, dtype=torch.int64, device=dev)
        for first, width in LEVELS:
            if width == 4:
                at = _round_up(at, 4)
            pos = tile_bit[:, None] + at[:, None] + width * (_exclusive_cumsum(went) if first else j)  # field order
            byte = stream[torch.where(went, pos >> 3, 0)]
            val = (byte >> (pos & 7)) & ((1 << width) - 1)
            rank = torch.where(went, first + val, rank)
            at = at + width * went.sum(dim=1)
            went = went & (val == 3) & (width == 2)
        out[r] = _natural_order(perm_t[rank]).reshape(-1)
    return out


def unpack_rows_reference(packed: torch.Tensor, lay: VlcLayout) -> torch.Tensor:
    """Plain-torch decoder (any device): packed uint8 [N, nbytes] -> bf16 [N, X]."""
    _check_packed("unpack_rows_reference", packed, lay, "packed rows")
    return assemble_reference(packed, lay, packed[:, :lay.Xg].long(), decode_codes_reference(packed, lay))

if HAVE_TRITON:

    @triton.jit
    def _popc_pairs(x):
        # the set bits of uint32 x whose bits lie at even positions only
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return ((x * 0x01010101) >> 24).to(tl.int32)

    @triton.jit
    def _window(words, bit):
        # the 32 bits of the stream (uint32 words, bit b = bit b % 32 of word b // 32) from bit `bit` (int64) on
        w = bit >> 5
        lo = tl.load(words + w).to(tl.uint64)
        hi = tl.load(words + w + 1).to(tl.uint64)
        return (((hi << 32) | lo) >> (bit & 31).to(tl.uint64)).to(tl.uint32)

    @triton.jit
    def _window64(words, bit):
        # the 64 bits of the stream from bit `bit` (int64, a multiple of 4) on
        w = bit >> 5
        o = (bit & 31).to(tl.uint64)
        lo = tl.load(words + w).to(tl.uint64)
        mid = tl.load(words + w + 1).to(tl.uint64)
        hi = tl.load(words + w + 2).to(tl.uint64)
        return (((mid << 32) | lo) >> o) | tl.where(o > 0, hi << ((64 - o) & 63), 0)

    @triton.jit
    def _went_on(win, n):
        # the fields equal to 3 among the first n (0..16) 2-bit fields of win: bit 2 i set for field i
        keep = ((tl.full(n.shape, 1, tl.uint64) << (2 * n).to(tl.uint64)) - 1).to(tl.uint32)
        return win & (win >> 1) & 0x55555555 & keep

    @triton.jit
    def _unpack_vlc_kernel(
        src_ptr, ids_ptr, dst_ptr, dst_row_ptr,
        X, K, nbytes, off_base, off_perm, off_tile, off_cnt, off_idx, off_val, off_stream,
        HAS_DST_ROW: tl.constexpr, G: tl.constexpr, T: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
        EXC_CHUNK: tl.constexpr,
    ):
        # program (i, p) expands tiles p, p + P, ... of packed row ids[i] into dst row dst_row[i] (or i), then
        # applies the exceptions that fall in them. Lane g of a tile holds group g: its level-1 word, and windows of
        # its level-2 and level-3 fields (at most 16 of each: 32 bits) and level-4 fields (64 bits), placed by prefix
        # sums over the groups of the counts that popcounts give; 16 steps then decode element s W + g at step s.
        W: tl.constexpr = T // 16
        i = tl.program_id(0)
        p = tl.program_id(1)
        row, out_row = _rows_of(ids_ptr, dst_row_ptr, i, HAS_DST_ROW)
        if (row >= 0) & (out_row >= 0):
            src = src_ptr + row * nbytes
            dst = dst_ptr + out_row * X
            cnt, idx0, val0 = _first_exceptions(src, off_cnt, off_idx, off_val, EXC_CHUNK)
            perm = tl.load((src + off_perm).to(tl.pointer_type(tl.int64)))
            perm_lo = perm.to(tl.int32)
            perm_hi = (perm >> 32).to(tl.int32)
            g = tl.arange(0, W)
            for k in range(p, K, NUM_PROGRAMS):
                word0 = tl.load((src + off_tile).to(tl.pointer_type(tl.int32)) + k).to(tl.int64)
                region = src + off_stream + 4 * word0  # the tile's first byte
                words = region.to(tl.pointer_type(tl.uint32))
                w1 = tl.load(words + g)
                e1 = w1 & (w1 >> 1) & 0x55555555
                c1 = _popc_pairs(e1)
                at2 = 2 * T
                win2 = _window(words, at2 + 2 * (tl.cumsum(c1, axis=0) - c1).to(tl.int64))
                e2 = _went_on(win2, c1)
                c2 = _popc_pairs(e2)
                at3 = at2 + 2 * tl.sum(c1, axis=0)
                win3 = _window(words, at3 + 2 * (tl.cumsum(c2, axis=0) - c2).to(tl.int64))
                c3 = _popc_pairs(_went_on(win3, c2))
                at4 = (at3 + 2 * tl.sum(c2, axis=0) + 3) // 4 * 4
                win4 = _window64(words, at4 + 4 * (tl.cumsum(c3, axis=0) - c3).to(tl.int64))
                k2 = tl.zeros([W], tl.int32)
                k3 = tl.zeros([W], tl.int32)
                k4 = tl.zeros([W], tl.int32)
                for s in tl.static_range(16):
                    f = ((w1 >> (2 * s)) & 3).to(tl.int32)
                    went1 = f == 3
                    f2 = ((win2 >> (2 * k2).to(tl.uint32)) & 3).to(tl.int32)
                    k2 += went1.to(tl.int32)
                    went2 = went1 & (f2 == 3)
                    f3 = ((win3 >> (2 * k3).to(tl.uint32)) & 3).to(tl.int32)
                    k3 += went2.to(tl.int32)
                    went3 = went2 & (f3 == 3)
                    f4 = ((win4 >> (4 * k4).to(tl.uint64)) & 15).to(tl.int32)
                    k4 += went3.to(tl.int32)
                    rank = tl.where(went1, tl.where(went2, tl.where(went3, 9 + f4, 6 + f3), 3 + f2), f)
                    code = tl.where(rank < 8, perm_lo >> (4 * rank), perm_hi >> (4 * (rank - 8))) & 15
                    e = k * T + s * W + g.to(tl.int64)  # (K T < 2^31)
                    lo = tl.load(src + e).to(tl.int32)
                    base = tl.load(src + off_base + e // G).to(tl.int32)
                    tl.store(dst + e, _bf16_bits(lo, code, base).to(tl.int16), mask=e < X)
            _apply_exceptions(src, dst, X, off_idx, off_val, p, cnt, idx0, val0, T, NUM_PROGRAMS, EXC_CHUNK)


def unpack_rows_gather_reference(src_EB: torch.Tensor, ids_n: torch.Tensor, dst_SX: torch.Tensor,
                                 lay: VlcLayout, dst_row_n: torch.Tensor | None = None) -> torch.Tensor:
    """dst[dst_row[i]] = unpack(src[ids[i]]) for every i with ids[i] >= 0 and dst_row[i] >= 0 (dst_row None: i)."""
    return gather_reference(unpack_rows_reference, src_EB, ids_n, dst_SX, lay, dst_row_n)


def unpack_rows(src_EB: torch.Tensor, ids_n: torch.Tensor, dst_SX: torch.Tensor, lay: VlcLayout,
                dst_row_n: torch.Tensor | None = None, num_programs: int = 1024, num_warps: int = 4,
                exc_chunk: int | None = None) -> torch.Tensor:
    """Expand packed rows of `src` (device memory: the later levels' fields are read by gathers, which suit GPU
    memory and not a link) chosen by `ids` (on the GPU) into rows of `dst` (on the GPU), without a host
    synchronisation: dst[dst_row[i]] = unpack(src[ids[i]]) for every i with ids[i] >= 0 and dst_row[i] >= 0
    (dst_row None: i).

    src [E, lay.nbytes] uint8 (only each row's used prefix is read) and dst [S, lay.X] bf16 must be contiguous;
    ids and dst_row are int32/int64 [n]. A grid of n x min(num_programs, K) programs, each expanding a tile at a
    time.
    """
    exc_chunk = check_unpack_args(src_EB, ids_n, dst_SX, lay, dst_row_n, num_programs, exc_chunk)
    if ids_n.numel() == 0:
        return dst_SX
    if not HAVE_TRITON or not (dst_SX.is_cuda or _interpreting()):
        return unpack_rows_gather_reference(src_EB, ids_n, dst_SX, lay, dst_row_n)
    n = ids_n.numel()
    num_programs = min(num_programs, lay.K)
    _unpack_vlc_kernel[(n, num_programs)](
        src_EB, ids_n, dst_SX.view(torch.int16), dst_row_n if dst_row_n is not None else ids_n,
        lay.X, lay.K, lay.nbytes, lay.off_base, lay.off_perm, lay.off_tile, lay.off_cnt, lay.off_idx, lay.off_val,
        lay.off_stream,
        HAS_DST_ROW=dst_row_n is not None, G=G, T=lay.T, NUM_PROGRAMS=num_programs, EXC_CHUNK=exc_chunk,
        num_warps=num_warps,
    )
    return dst_SX

