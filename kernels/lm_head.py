"""The decode step's LM head as one kernel that also finds each vocabulary tile's argmax, for greedy decoding.

Why: at the end of a captured greedy step, after the last MoE block, come the head's scale (h * d_model^-0.5
for tied embeddings), the [V, D] matrix product (cuBLAS, bf16 out), the cast of the logits to fp32 and the
greedy choice, which reads all V logits again: four launches and ~29 us on the H200 for switch-base-128
(bench/results/profile-decode-compress-h200.json: 16.7 us of matrix product, 6.8 us of choice), on the step's
critical path, where nothing overlaps them. Here one kernel reads each weight row once, writes the fp32 logits
(the step still returns them) and, per tile of BLOCK_V rows, the tile's maximum and its first index; the
greedy choice (kernels/greedy.py, greedy_select with partials) then reduces V / BLOCK_V partials, not V logits.

With the last block's residual and output (add, norm_weight: Switch.decode_hidden(split_last=True)) the kernel also
takes the final residual add and the final RMS norm: two launches fewer at the step's end. Each program sums the
squares of its rows itself as it streams them beside the weights (D values, against BLOCK_V rows of D weights) and
scales its sums by the rows' 1 / rms at the end: x = round(norm_weight * (h + add) * scale), logit = round(rstd *
sum(x w)), the norm's scale applied once, after the products (the norm kernel rounds the normalised row first: a
logit may differ from that path's by a few steps of the weights' dtype).

Numerics as the PyTorch path's: x = h * scale rounded to the weights' dtype, products summed in fp32 (in
another order than cuBLAS's), each logit rounded to the weights' dtype and returned as fp32. A tile's partial
follows torch.argmax: the first index of the maximum; a NaN counts as larger than any number (the tile's first
NaN: its value NaN, its index that NaN's); a tile of -inf gives -inf at its first index. Reduced in tile order
(the first NaN tile, else the largest value, ties to the earlier tile), the partials give torch.argmax's index.

Legend: B rows, D model width, V vocabulary, P = ceil(V / BLOCK_V) tiles.
"""

from __future__ import annotations

import torch

from kernels.rmsnorm import rmsnorm_reference
from kernels.routing import fp32_dot

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

MAX_ROWS = 64  # more rows than this: the PyTorch path (a matrix product proper)
# the tile, from scripts/probe_lm_head.py --sweep on the H200 (bench/results/probe-lm-head-h200.json): tl.dot with
# the rows padded to 16 (one row too: products summed in registers instead took 30-55 us there, tl.dot ~21)
CONFIG = {"block_v": 128, "block_d": 64, "warps": 4, "stages": 3}


if HAVE_TRITON:

    @triton.jit
    def _lm_head_kernel(x_ptr, y_ptr, nw_ptr, w_ptr, logits_ptr, pval_ptr, pidx_ptr, B, V, D, stride_x, stride_y,
                        stride_w, stride_l, stride_p, scale, eps, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_D: tl.constexpr, IEEE: tl.constexpr, STAGES: tl.constexpr, NORM: tl.constexpr):
        pid = tl.program_id(0)
        offs_v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
        offs_b = tl.arange(0, BLOCK_B)
        vmask = offs_v < V
        bmask = offs_b < B
        wdt = w_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
        ss = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            x = tl.load(x_ptr + offs_b[:, None] * stride_x + offs_d[None, :], mask=bmask[:, None] & dmask[None, :],
                        other=0.0)
            if NORM:  # h = x + y in the model's dtype; its squares summed; the row's 1 / rms applied to the sums
                b = tl.load(y_ptr + offs_b[:, None] * stride_y + offs_d[None, :],
                            mask=bmask[:, None] & dmask[None, :], other=0.0)
                hs = (x.to(tl.float32) + b.to(tl.float32)).to(wdt).to(tl.float32)
                ss += tl.sum(hs * hs, axis=1)
                nw = tl.load(nw_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
                x = (nw[None, :] * hs * scale).to(wdt)
            else:
                x = (x.to(tl.float32) * scale).to(wdt)  # h * scale in the weights' dtype, as PyTorch rounds it
            w = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_d[None, :], mask=vmask[:, None] & dmask[None, :],
                        other=0.0)
            if IEEE:  # fp32 operands (fp32 weights, or the interpreter, whose bf16 dot is wrong: products exact)
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        if NORM:
            acc = acc * (1.0 / tl.sqrt(ss / D + eps))[:, None]
        logits = acc.to(wdt).to(tl.float32)  # the model's logits (its dtype), as fp32
        lmask = bmask[:, None] & vmask[None, :]
        tl.store(logits_ptr + offs_b[:, None] * stride_l + offs_v[None, :], logits, mask=lmask)
        big = V + BLOCK_V
        is_nan = (logits != logits) & vmask[None, :]
        nan_i = tl.min(tl.where(is_nan, offs_v[None, :], big), axis=1)
        xs = tl.where(is_nan | (offs_v[None, :] >= V), -float("inf"), logits)
        m = tl.max(xs, axis=1)
        i = tl.min(tl.where((xs == m[:, None]) & vmask[None, :], offs_v[None, :], big), axis=1)
        has_nan = nan_i < big
        val = tl.where(has_nan, float("nan"), m)
        idx = tl.where(has_nan, nan_i, i)
        tl.store(pval_ptr + offs_b * stride_p + pid, val, mask=bmask)
        tl.store(pidx_ptr + offs_b * stride_p + pid, idx.to(tl.int32), mask=bmask)


def tiles(V: int, block_v: int) -> int:
    """P: the number of partials per row."""
    return -(-V // block_v)


def supported(rows: int, weight: torch.Tensor, force_triton: bool = False) -> bool:
    """Whether lm_head_partials takes `rows` rows of the weight's width and dtype against `weight` [V, D] (else use
    lm_head_reference and the plain greedy choice)."""
    return (HAVE_TRITON and (weight.is_cuda or force_triton) and weight.dim() == 2 and 1 <= rows <= MAX_ROWS
            and weight.dtype in (torch.bfloat16, torch.float16, torch.float32) and weight.stride(1) == 1)


def lm_head_partials(h: torch.Tensor, weight: torch.Tensor, scale: float, logits: torch.Tensor,
                     pval: torch.Tensor, pidx: torch.Tensor, block_v: int | None = None, block_d: int | None = None,
                     warps: int | None = None, stages: int | None = None, add: torch.Tensor | None = None,
                     norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """logits [B, V] fp32 <- round(round(h * scale) @ weight.T) (rounded to weight's dtype), and per row and tile
    of block_v vocabulary rows its (maximum, first index) in pval [B, P] fp32 / pidx [B, P] int32. Returns logits.
    add and norm_weight [D] (with eps): h is the last block's residual and `add` its output; the head takes
    rmsnorm(h + add) (the sum rounded to the weights' dtype; the norm's scale applied to the products' sums, see the
    module docstring) instead of h, so the final add and norm need no launch of their own."""
    B, D = h.shape
    V = weight.shape[0]
    bv = block_v or CONFIG["block_v"]
    P = tiles(V, bv)
    if not supported(B, weight, force_triton=True) or h.dtype != weight.dtype or D != weight.shape[1]:
        raise ValueError(f"lm_head_partials: h {h.dtype} {tuple(h.shape)} and weight {weight.dtype} "
                         f"{tuple(weight.shape)}: need 1..{MAX_ROWS} rows of the weight's width and dtype")
    if (add is None) != (norm_weight is None) or (add is not None and (
            add.shape != h.shape or add.dtype != h.dtype or norm_weight.shape != (D,)
            or norm_weight.dtype != weight.dtype or not norm_weight.is_contiguous())):
        got_a = None if add is None else (add.dtype, tuple(add.shape))
        got_w = None if norm_weight is None else (norm_weight.dtype, tuple(norm_weight.shape))
        raise ValueError("lm_head_partials: add [B, D] (h's dtype) and norm_weight [D] (contiguous, the weights' "
                         f"dtype) go together; got add {got_a}, norm_weight {got_w}")
    if logits.shape != (B, V) or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"lm_head_partials: logits must be fp32 [{B}, {V}], got {logits.dtype} {tuple(logits.shape)}")
    if (pval.shape != (B, P) or pidx.shape != (B, P) or pval.dtype != torch.float32 or pidx.dtype != torch.int32
            or pval.stride() != pidx.stride() or pval.stride(1) != 1):
        raise ValueError(f"lm_head_partials: partials must be fp32 / int32 [{B}, {P}] of one layout, got "
                         f"{pval.dtype} {tuple(pval.shape)} / {pidx.dtype} {tuple(pidx.shape)}")
    if h.stride(1) != 1:
        h = h.contiguous()
    if add is not None and add.stride(1) != 1:
        add = add.contiguous()
    block_b = max(16, triton.next_power_of_2(B))
    norm = add is not None
    _lm_head_kernel[(P,)](h, add if norm else h, norm_weight if norm else weight, weight, logits, pval, pidx, B, V, D,
                          h.stride(0), add.stride(0) if norm else 0, weight.stride(0), logits.stride(0),
                          pval.stride(0), float(scale), float(eps), BLOCK_B=block_b, BLOCK_V=bv,
                          BLOCK_D=block_d or CONFIG["block_d"], IEEE=fp32_dot(weight.dtype),
                          STAGES=stages or CONFIG["stages"], NORM=norm, num_warps=warps or CONFIG["warps"])
    return logits


def lm_head_reference(h: torch.Tensor, weight: torch.Tensor, scale: float, add: torch.Tensor | None = None,
                      norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """The model's path: F.linear(h * scale, weight) in the weights' dtype, as fp32 [B, V] (with add: of
    rmsnorm(h + add))."""
    if add is not None:
        h = rmsnorm_reference(h + add, norm_weight, eps)
    x = h * scale if scale != 1.0 else h
    return torch.nn.functional.linear(x, weight).float()


__all__ = ["lm_head_partials", "lm_head_reference", "supported", "tiles", "CONFIG", "MAX_ROWS",
           "HAVE_TRITON"]
