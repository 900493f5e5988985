"""Beam search's reorder of the decoder's self-attention caches as one in-place kernel over the written positions.

Why: after each beam step the running beams take the caches of the rows they extend (rows[r] <- rows[src[r]]). As a
gather (`buf.copy_(buf.index_select(0, src))` over every block's keys and values, models.switch.DecodeState.reorder)
that reads and writes the whole buffer twice, every position up to the length limit, through a temporary as large
as the caches: 172 us per step for switch-base-128 and 456 us for switch-large-128 at beam 4 on the H200
(bench/results/probe-beam-select-h200.md), at the start of every step, where it holds back the compute stream (and
with it the first MoE block's routing, and so every later copy). Here one kernel moves only what a step can read:
positions below `pos` (the steps written so far; the later ones are written before they are read, and until then
the causal mask gives them weight 0) of the rows whose source is another row, in place, with no temporary.

In place: a program owns one tile of positions of one (buffer, head) slab for every row at once; it loads the tile of
each row's source, waits at a CTA barrier, then stores: every read of the tile precedes every write to it, and no other
program touches that tile, so any `src` (a permutation, repeated sources, cycles) gives the gather's result.

Layout: buf [S, B, H, L] (any strides; L contiguous): S slabs (keys and values of each block), B rows, H heads, L =
max positions x head width. Written prefix: pos * unit elements of each L (unit = the head width).
"""

from __future__ import annotations

import torch

from kernels.routing import use_triton

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

TILE = 8192  # elements per program (rows x positions): registers of 4 warps, one wide load per thread and row


if HAVE_TRITON:

    @triton.jit
    def _reorder_kernel(buf_ptr, src_ptr, pos_ptr, B, H, L, unit, stride_s, stride_b, stride_h,
                        BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
        sh = tl.program_id(0)
        s = sh // H
        h = sh % H
        offs = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        written = tl.minimum(tl.load(pos_ptr) * unit, L)
        rows = tl.arange(0, BLOCK_R)
        rmask = rows < B
        src = tl.load(src_ptr + rows, mask=rmask, other=0)
        move = rmask & (src != rows)
        mask = move[:, None] & (offs < written)[None, :]
        base = buf_ptr + s.to(tl.int64) * stride_s + h.to(tl.int64) * stride_h + offs[None, :]
        x = tl.load(base + src.to(tl.int64)[:, None] * stride_b, mask=mask)
        tl.debug_barrier()  # every row's read of this tile before any row's write to it
        tl.store(base + rows.to(tl.int64)[:, None] * stride_b, x, mask=mask)


def reorder_reference(buf: torch.Tensor, src: torch.Tensor) -> None:
    """buf [S, B, ...] rows <- rows[src], every position (the gather)."""
    view = buf.transpose(0, 1)
    view.copy_(view.index_select(0, src))


def supported(buf: torch.Tensor) -> bool:
    """Whether reorder_written takes buf [S, B, H, L] (L contiguous) on the kernel's path."""
    return use_triton(buf) and buf.dim() == 4 and buf.stride(3) == 1


def reorder_written(buf: torch.Tensor, src: torch.Tensor, pos: torch.Tensor, unit: int) -> None:
    """In place: buf [S, B, H, L] rows r <- rows src[r] over the first pos * unit elements of each L (pos: a device
    scalar / [1] long, read by the kernel: no host synchronisation). Elsewhere the rows keep their values. Without
    the kernel's path (the CPU outside the interpreter's tests): the reference's gather of every position."""
    if src.dim() != 1 or src.numel() != buf.shape[1]:
        raise ValueError(f"reorder_written: src must be [{buf.shape[1]}] (one source row per row), got "
                         f"{tuple(src.shape)}")
    if not supported(buf):
        reorder_reference(buf, src)
        return
    S, B, H, L = buf.shape
    src = src.contiguous()  # (an expanded index, e.g. every row from one, has stride 0: the kernel reads it densely)
    block_r = triton.next_power_of_2(B)
    block_l = max(16, min(triton.next_power_of_2(L), TILE // block_r))
    grid = (S * H, triton.cdiv(L, block_l))
    _reorder_kernel[grid](buf, src, pos, B, H, L, int(unit), buf.stride(0), buf.stride(1), buf.stride(2),
                          BLOCK_R=block_r, BLOCK_L=block_l, num_warps=4)


__all__ = ["reorder_written", "reorder_reference", "supported", "TILE"]
