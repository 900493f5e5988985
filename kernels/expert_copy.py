"""Device-driven expert copies: a kernel that gathers rows of a pinned host buffer into GPU slots,
indexed by expert ids that live on the GPU.

Why: a copy started by the host (cudaMemcpyAsync) needs the expert id on the host, i.e. a sync
after every gate, which breaks CUDA-graph capture of the decode step. Pinned host memory is
mapped into the GPU's address space (UVA), so a kernel can read it directly over PCIe: the
routing result never leaves the GPU and the whole step, copies included, can be one graph.
A small persistent grid (NUM_PROGRAMS per row) keeps most SMs free for the compute it overlaps.

Legend: E rows in the store (experts), C elements per row (one expert's w_in and w_out), n ids.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _gather_rows_kernel(
        src_ptr, ids_ptr, dst_ptr, dst_row_ptr,
        C, NC,
        HAS_DST_ROW: tl.constexpr, BLOCK: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    ):
        # program (i, p) copies blocks p, p + P, p + 2P, ... of the first NC elements of row ids[i] (rows C apart)
        # into dst row dst_row[i] (or i).
        i = tl.program_id(0)
        p = tl.program_id(1)
        row = tl.load(ids_ptr + i).to(tl.int64)
        if HAS_DST_ROW:
            out_row = tl.load(dst_row_ptr + i).to(tl.int64)
        else:
            out_row = i.to(tl.int64)
        if (row >= 0) & (out_row >= 0):  # a negative id or slot means "nothing to copy"
            src = src_ptr + row * C
            dst = dst_ptr + out_row * C
            for start in range(p * BLOCK, NC, NUM_PROGRAMS * BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < NC
                tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def gather_rows_reference(src_EC: torch.Tensor, ids_n: torch.Tensor, dst_SC: torch.Tensor,
                          dst_row_n: torch.Tensor | None = None, cols: int | None = None) -> torch.Tensor:
    """dst[dst_row[i], :cols] = src[ids[i], :cols] for every i with ids[i] >= 0 and dst_row[i] >= 0 (dst_row None:
    i; cols None: whole rows)."""
    ids = ids_n.long().cpu()
    rows = torch.arange(len(ids)) if dst_row_n is None else dst_row_n.long().cpu()
    for e, r in zip(ids.tolist(), rows.tolist()):
        if e >= 0 and r >= 0:
            dst_SC[r, :cols].copy_(src_EC[e, :cols])
    return dst_SC


def gather_rows(src_EC: torch.Tensor, ids_n: torch.Tensor, dst_SC: torch.Tensor,
                dst_row_n: torch.Tensor | None = None, num_programs: int = 16, block: int = 4096,
                num_warps: int = 4, cols: int | None = None) -> torch.Tensor:
    """Copy rows of `src` (pinned host memory, or any memory the GPU can address) chosen by `ids`
    (on the GPU) into rows of `dst` (on the GPU), without a host synchronisation; with `cols`, only each row's first
    cols elements.

    src [E, C] and dst [S, C] must be contiguous and of one dtype; ids and dst_row are int32/int64 [n].
    """
    if src_EC.dtype != dst_SC.dtype or src_EC.shape[1:] != dst_SC.shape[1:]:
        raise ValueError(f"gather_rows: src {tuple(src_EC.shape)} {src_EC.dtype} and dst "
                         f"{tuple(dst_SC.shape)} {dst_SC.dtype} must share the row size and dtype")
    if not (src_EC.is_contiguous() and dst_SC.is_contiguous()):
        raise ValueError("gather_rows: src and dst must be contiguous")
    n = ids_n.numel()
    C = src_EC[0].numel()
    if cols is not None and not 0 < cols <= C:
        raise ValueError(f"gather_rows: cols must be in 1..{C} (the row's elements), got {cols}")
    if n == 0:
        return dst_SC
    if not HAVE_TRITON or not (dst_SC.is_cuda or _interpreting()):
        return gather_rows_reference(src_EC, ids_n, dst_SC, dst_row_n, cols)
    if src_EC.device.type == "cpu" and dst_SC.is_cuda and not src_EC.is_pinned():
        raise ValueError("gather_rows: a host source must be pinned (page-locked) to be read by the GPU")
    _gather_rows_kernel[(n, num_programs)](
        src_EC, ids_n, dst_SC, dst_row_n if dst_row_n is not None else ids_n, C, C if cols is None else cols,
        HAS_DST_ROW=dst_row_n is not None, BLOCK=block, NUM_PROGRAMS=num_programs, num_warps=num_warps,
    )
    return dst_SC


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
