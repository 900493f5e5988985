"""Sparse expert FFN: y[t] = sum_j w[t, j] * W_out[s] @ act(W_in[s] @ x[t]), s = slot_of_expert[ids[t, j]].

Two Triton paths, picked by the number of token slots R = T*k (tuned per GPU, see kernels/tuning.py):
  decode  (a few slots): no sort; a GEMV program per (token slot, F tile), then one per (token, d tile)
          that also sums the k slots. Bound by reading the activated experts' weights. On Hopper the
          kernels are chained by programmatic dependent launch (PDL): the second starts, and loads its
          W_out rows (into registers with whole-row tiles, out "preload"; else into L2), while the first
          still runs, so the two weight reads overlap.
  fused   (opt-in config, not a default): one kernel per (token slot, F tile) doing both GEMVs, and a
          fixed-order reduce of the F-tile partials; measured slower than decode on the H200.
  (A one-launch form with producer programs publishing h through a counter and consumer programs holding
  their W_out tile in registers while they wait was measured on the H200 and removed: 7.1-9.4 us vs 6.3 us
  for switch-base, 9.1-11.7 vs 8.2 for switch-large; bench/results/kernels-nvidia-h200-signal-preload-sweep.md.
  Also measured and removed: the first kernel asking L2 for its W_in tile before its PDL wait, when the caller says
  the ids were final one kernel earlier, and the second kernel triggering the next PDL kernel once h is ready, so
  back-to-back calls overlap: 5.69 vs 5.44 us per call for switch-base, 7.75 vs 7.72 for switch-large, and slower
  after a routing kernel too; built at commits 99c17ea and cbbe060, bench/results/kernels-nvidia-h200-ids-ahead.md
  and kernels-nvidia-h200-chain-sweep.md.)
  gridsync (opt-in config, not a default): one launch of <= #SM programs: W_out tiles prefetched to L2,
          the h tiles, a grid barrier, then y from L2. Correct and deterministic on the H200, but slower
          than decode there (T = 1, 16 back to back: 10.4 vs 7.4 us switch-base, 13.3 vs 10.5 us
          switch-large; bench/results/kernels-nvidia-h200-gridsync-sweep.md).
  prefill (many slots):  token slots grouped by weight slot (kernels.routing.group_by_slot), then two
          grouped GEMMs over M-row tiles that each belong to one slot (tl.dot, fp32 accumulation).
Weights are always read through slot_of_expert, so the offload runner can put an expert in any slot.
The path and tiles depend only on (E, d, F, the batch's token count), not on S or on which other tokens
share a call (choose_config), so a token's output is the same under every offload policy, bitwise.
Neither path synchronizes the host, so both can be captured in a CUDA graph.

Legend: T tokens, d model width, F expert hidden width (2F rows in w_in for gated activations), S weight
slots, E experts, k experts per token, R = T*k token slots, P grouped positions (see Grouping).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels import tuning
from kernels.routing import HAVE_TRITON, fp32_dot, group_by_slot, use_pdl, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ACTIVATIONS = ("relu", "gelu", "silu", "geglu", "swiglu")


class Int8Weights(NamedTuple):
    """Expert weights as symmetric per-row int8: w[s, r, :] ~= q[s, r, :] * scale[s, r] (quantize_experts;
    the scheme of int8 checkpoints too, models.checkpoint.quantize_int8). Both paths read q as int8 and apply the scale
    once per output row after the sum, so a copy of the weights moves half of bf16's bytes."""

    q: torch.Tensor  # int8 [S, R, C] (any strides with the last one 1)
    scale: torch.Tensor  # float32 [S, R]

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, s: int, dtype: torch.dtype) -> torch.Tensor:
        """Slot s's weights in dtype (q * scale computed in dtype)."""
        return self.q[s].to(dtype) * self.scale[s].to(dtype)[:, None]


def quantize_experts(w: torch.Tensor) -> Int8Weights:
    """Int8Weights of w [..., R, C]: symmetric per row, scale = absmax / 127 (fp32)."""
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    q = torch.round(w32 / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weights(q, scale)


def _quantized(w_in, w_out) -> bool:
    """Whether the weights are Int8Weights (both must be, or neither)."""
    quant = isinstance(w_in, Int8Weights)
    if quant != isinstance(w_out, Int8Weights):
        raise ValueError("w_in and w_out must both be Int8Weights or both tensors")
    return quant


# name -> (ACT code of _activate, GATED)
_ACT_CODE = {"relu": (0, False), "gelu": (1, False), "silu": (2, False), "geglu": (1, True),
             "swiglu": (2, True)}


def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "silu":
        return F.silu(h)
    if activation in ("geglu", "swiglu"):
        gate, up = h.chunk(2, dim=-1)
        return (F.gelu(gate) if activation == "geglu" else F.silu(gate)) * up
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


# ------------------------------------------------------------------------------------------------ kernels
if HAVE_TRITON:

    @triton.jit
    def _activate(h, up, ACT: tl.constexpr, GATED: tl.constexpr):
        # ACT: 0 relu, 1 exact (erf) gelu, 2 silu; GATED multiplies by the "up" half (geglu, swiglu).
        if ACT == 0:
            h = tl.maximum(h, 0.0)
        elif ACT == 1:
            h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
        else:
            h = h * tl.sigmoid(h)
        if GATED:
            h = h * up
        return h

    @triton.jit
    def _prefetch_l2(ptrs):
        # Fire-and-forget PTX L2 prefetch; not pure, so it stays although its dummy result is unused.
        return tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                         dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _slot_of(ids_ptr, slot_of_expert_ptr, r, HAS_SLOT_MAP: tl.constexpr):
        # the weight slot of token slot r: its expert id, through the slot table when there is one
        slot = tl.load(ids_ptr + r)
        if HAS_SLOT_MAP:
            slot = tl.load(slot_of_expert_ptr + slot)
        return slot

    @triton.jit
    def _prefetch_w_out_rows(w_out_ptr, ids_ptr, slot_of_expert_ptr, t, offs_d, D, F, stride_ws, stride_wd,
                             stride_wf, K: tl.constexpr, HAS_SLOT_MAP: tl.constexpr, F_LINES: tl.constexpr,
                             LINE: tl.constexpr):
        # Ask L2 for rows offs_d of W_out of token t's K experts (one prefetch per 128-byte line).
        lines = tl.minimum(tl.arange(0, F_LINES) * LINE, F - 1)
        for j in tl.static_range(K):
            slot = _slot_of(ids_ptr, slot_of_expert_ptr, t * K + j, HAS_SLOT_MAP)
            _prefetch_l2(w_out_ptr + slot.to(tl.int64) * stride_ws
                         + tl.minimum(offs_d, D - 1)[:, None] * stride_wd + lines[None, :] * stride_wf)

    @triton.jit
    def _gemv_in_tile(x_ptr, w_in_ptr, slot, r, offs_f, mask_f, D, F, stride_xt, stride_xd, stride_ws, stride_wf,
                      stride_wd, K: tl.constexpr, GATED: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_F: tl.constexpr, s_ptr, stride_ss, stride_sf, HAS_SCALE: tl.constexpr):
        # W_in[slot, f-tile, :] @ x[r // K] in fp32 (and the "up" half for gated activations); x is
        # rounded to the weights' dtype first, as the reference does. HAS_SCALE: W_in is int8 with a
        # per-row scale s[slot, f] (x stays in its dtype; the row sums are scaled once at the end).
        offs_d = tl.arange(0, BLOCK_D)
        x_ptrs = x_ptr + (r // K) * stride_xt + offs_d * stride_xd
        w_ptrs = (w_in_ptr + slot.to(tl.int64) * stride_ws
                  + offs_f[:, None] * stride_wf + offs_d[None, :] * stride_wd)
        acc_F = tl.zeros([BLOCK_F], dtype=tl.float32)
        up_F = tl.zeros([BLOCK_F], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask_d = offs_d < D - d0
            x_D = tl.load(x_ptrs, mask=mask_d, other=0.0)
            if not HAS_SCALE:
                x_D = x_D.to(w_in_ptr.dtype.element_ty)
            x_D = x_D.to(tl.float32)
            mask_FD = mask_f[:, None] & mask_d[None, :]
            w_FD = tl.load(w_ptrs, mask=mask_FD, other=0.0, eviction_policy="evict_first")
            acc_F += tl.sum(w_FD.to(tl.float32) * x_D[None, :], axis=1)
            if GATED:
                u_FD = tl.load(w_ptrs + F * stride_wf, mask=mask_FD, other=0.0, eviction_policy="evict_first")
                up_F += tl.sum(u_FD.to(tl.float32) * x_D[None, :], axis=1)
            x_ptrs += BLOCK_D * stride_xd
            w_ptrs += BLOCK_D * stride_wd
        if HAS_SCALE:
            s_F = s_ptr + slot.to(tl.int64) * stride_ss + offs_f * stride_sf
            acc_F *= tl.load(s_F, mask=mask_f, other=0.0).to(tl.float32)
            if GATED:
                up_F *= tl.load(s_F + F * stride_sf, mask=mask_f, other=0.0).to(tl.float32)
        return acc_F, up_F

    @triton.jit
    def _h_tile(x_ptr, w_in_ptr, ids_ptr, slot_of_expert_ptr, h_ptr, r, pid_f, D, F, stride_xt, stride_xd,
                stride_ws, stride_wf, stride_wd, K: tl.constexpr, HAS_SLOT_MAP: tl.constexpr, ACT: tl.constexpr,
                GATED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, s_ptr, stride_ss, stride_sf,
                HAS_SCALE: tl.constexpr):
        # h[r, f-tile pid_f] = act(W_in[s, f-tile, :] @ x[r // K]), stored in the weights' dtype; the
        # pre-activation is rounded to it first, like the reference's (and the prefill path's).
        slot = _slot_of(ids_ptr, slot_of_expert_ptr, r, HAS_SLOT_MAP)
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        acc_F, up_F = _gemv_in_tile(x_ptr, w_in_ptr, slot, r, offs_f, mask_f, D, F, stride_xt, stride_xd,
                                    stride_ws, stride_wf, stride_wd, K, GATED, BLOCK_D, BLOCK_F, s_ptr, stride_ss,
                                    stride_sf, HAS_SCALE)
        acc_F = acc_F.to(h_ptr.dtype.element_ty).to(tl.float32)
        up_F = up_F.to(h_ptr.dtype.element_ty).to(tl.float32)
        h_F = _activate(acc_F, up_F, ACT, GATED)
        tl.store(h_ptr + r * F + offs_f, h_F.to(h_ptr.dtype.element_ty), mask=mask_f)

    @triton.jit
    def _decode_in_kernel(
        x_ptr, w_in_ptr, ids_ptr, slot_of_expert_ptr, h_ptr, s_ptr,
        D, F,
        stride_xt, stride_xd, stride_ws, stride_wf, stride_wd, stride_ss, stride_sf,
        K: tl.constexpr, HAS_SLOT_MAP: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
        USE_PDL: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SCALE: tl.constexpr,
    ):
        # h[r, f-tile] = act(W_in[s, f-tile, :] @ x[t]): a GEMV; the weight tile is the only real traffic.
        if USE_PDL:  # ids (and x) come from earlier kernels; let _decode_out_kernel start loading W_out
            gdc_wait()
            gdc_launch_dependents()
        _h_tile(x_ptr, w_in_ptr, ids_ptr, slot_of_expert_ptr, h_ptr, tl.program_id(0), tl.program_id(1), D, F,
                stride_xt, stride_xd, stride_ws, stride_wf, stride_wd, K, HAS_SLOT_MAP, ACT, GATED, BLOCK_D, BLOCK_F,
                s_ptr, stride_ss, stride_sf, HAS_SCALE)

    @triton.jit
    def _decode_out_kernel(
        h_ptr, w_out_ptr, ids_ptr, slot_of_expert_ptr, weights_ptr, y_ptr, s_ptr,
        D, F,
        stride_ws, stride_wd, stride_wf, stride_yt, stride_yd, stride_ss, stride_sd,
        K: tl.constexpr, HAS_SLOT_MAP: tl.constexpr, USE_PDL: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, F_LINES: tl.constexpr, LINE: tl.constexpr,
        HAS_SCALE: tl.constexpr, PRELOAD: tl.constexpr,
    ):
        # y[t, d-tile] = sum_j w[t, j] * W_out[s_j, d-tile, :] @ h[t*K + j]: the k-sum happens here, in a
        # fixed order, so the output needs no atomics and no second pass. With PDL this kernel starts
        # while _decode_in_kernel runs (ids were final before that one passed its gdc_wait): the W_out
        # tiles load first, and only reading h waits for _decode_in_kernel to finish. PRELOAD (whole rows,
        # BLOCK_F >= F): the first slot's tile is loaded into registers before the wait; else it is asked
        # into L2 (no registers held).
        t = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_f = tl.arange(0, BLOCK_F)
        mask_d = offs_d < D
        if PRELOAD:
            slot0 = _slot_of(ids_ptr, slot_of_expert_ptr, t * K, HAS_SLOT_MAP)
            w0_DF = tl.load(w_out_ptr + slot0.to(tl.int64) * stride_ws + offs_d[:, None] * stride_wd
                            + offs_f[None, :] * stride_wf, mask=mask_d[:, None] & (offs_f < F)[None, :], other=0.0,
                            eviction_policy="evict_first")
        if USE_PDL:
            if (not PRELOAD) or K > 1:
                _prefetch_w_out_rows(w_out_ptr, ids_ptr, slot_of_expert_ptr, t, offs_d, D, F, stride_ws, stride_wd,
                                     stride_wf, K, HAS_SLOT_MAP, F_LINES, LINE)
            gdc_wait()  # h is written by _decode_in_kernel
        acc_D = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(K):
            r = t * K + j
            slot = _slot_of(ids_ptr, slot_of_expert_ptr, r, HAS_SLOT_MAP)
            w_ptrs = (w_out_ptr + slot.to(tl.int64) * stride_ws
                      + offs_d[:, None] * stride_wd + offs_f[None, :] * stride_wf)
            h_ptrs = h_ptr + r * F + offs_f
            part_D = tl.zeros([BLOCK_D], dtype=tl.float32)
            if PRELOAD and j == 0:
                h_F = tl.load(h_ptrs, mask=offs_f < F, other=0.0).to(tl.float32)
                part_D += tl.sum(w0_DF.to(tl.float32) * h_F[None, :], axis=1)
            else:
                for f0 in range(0, F, BLOCK_F):
                    mask_f = offs_f < F - f0
                    h_F = tl.load(h_ptrs, mask=mask_f, other=0.0).to(tl.float32)
                    w_DF = tl.load(w_ptrs, mask=mask_d[:, None] & mask_f[None, :], other=0.0,
                                   eviction_policy="evict_first")
                    part_D += tl.sum(w_DF.to(tl.float32) * h_F[None, :], axis=1)
                    h_ptrs += BLOCK_F
                    w_ptrs += BLOCK_F * stride_wf
            if HAS_SCALE:  # int8 W_out: its per-row (per d) scale
                part_D *= tl.load(s_ptr + slot.to(tl.int64) * stride_ss + offs_d * stride_sd, mask=mask_d,
                                  other=0.0).to(tl.float32)
            acc_D += tl.load(weights_ptr + r).to(tl.float32) * part_D
        tl.store(y_ptr + t * stride_yt + offs_d * stride_yd, acc_D.to(y_ptr.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _decode_fused_kernel(
        x_ptr, w_in_ptr, w_out_ptr, ids_ptr, slot_of_expert_ptr, weights_ptr, part_ptr,
        D, F,
        stride_xt, stride_xd, stride_wis, stride_wif, stride_wid, stride_wos, stride_wod, stride_wof,
        K: tl.constexpr, HAS_SLOT_MAP: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
        USE_PDL: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DO: tl.constexpr,
    ):
        # One launch per (token slot r, F tile): h_tile = act(W_in[s, f-tile, :] @ x[t]), then at once
        # w[r] * W_out[s, :, f-tile] @ h_tile, a partial [D] of y[t]. Both weight tiles are requested at
        # the start (the first W_out chunk does not depend on h), so each program costs about one memory
        # round trip and the whole expert is in flight at once. The partial goes to part [R, n_f, D]
        # (fp32); _decode_reduce_kernel sums them in a fixed order (bitwise deterministic).
        # On the H200 this is slower than the two-kernel decode path (see bench/results/kernels-*.md):
        # W_out is read in BLOCK_F-wide column strips (32-64 B per row) and n_f partials go through L2.
        # Not a default; kept as a config ("path": "fused") for comparison. An atomic-accumulate variant
        # with a last-arriving cast was tried on the H200 and dropped: slower, and wrong results at
        # T = 4, k = 2 (the relaxed fp32 atomics were not ordered before the last program's read).
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        r = tl.program_id(0)
        pid_f = tl.program_id(1)
        n_f = tl.num_programs(1)
        slot = _slot_of(ids_ptr, slot_of_expert_ptr, r, HAS_SLOT_MAP)
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        offs_do = tl.arange(0, BLOCK_DO)
        wo_ptrs = (w_out_ptr + slot.to(tl.int64) * stride_wos
                   + offs_do[:, None] * stride_wod + offs_f[None, :] * stride_wof)
        wo_DF = tl.load(wo_ptrs, mask=(offs_do < D)[:, None] & mask_f[None, :], other=0.0,
                        eviction_policy="evict_first")
        acc_F, up_F = _gemv_in_tile(x_ptr, w_in_ptr, slot, r, offs_f, mask_f, D, F, stride_xt, stride_xd,
                                    stride_wis, stride_wif, stride_wid, K, GATED, BLOCK_D, BLOCK_F, x_ptr, 0, 0, False)
        # The same roundings as the two-kernel path and the reference: pre-activation and h in w's dtype.
        acc_F = acc_F.to(w_in_ptr.dtype.element_ty).to(tl.float32)
        up_F = up_F.to(w_in_ptr.dtype.element_ty).to(tl.float32)
        h_F = _activate(acc_F, up_F, ACT, GATED).to(w_in_ptr.dtype.element_ty).to(tl.float32)
        h_F = h_F * tl.load(weights_ptr + r).to(tl.float32)  # exact enough: one fp32 rounding per term
        out_ptrs = part_ptr + (r * n_f + pid_f) * D + offs_do
        part_D = tl.sum(wo_DF.to(tl.float32) * h_F[None, :], axis=1)
        tl.store(out_ptrs, part_D, mask=offs_do < D)
        for d0 in range(BLOCK_DO, D, BLOCK_DO):  # d > BLOCK_DO only
            out_ptrs += BLOCK_DO
            wo_ptrs += BLOCK_DO * stride_wod
            mask_do = offs_do < D - d0
            wo_DF = tl.load(wo_ptrs, mask=mask_do[:, None] & mask_f[None, :], other=0.0,
                            eviction_policy="evict_first")
            part_D = tl.sum(wo_DF.to(tl.float32) * h_F[None, :], axis=1)
            tl.store(out_ptrs, part_D, mask=mask_do)

    @triton.jit
    def _decode_reduce_kernel(
        part_ptr, y_ptr, D, N_F, stride_yt, stride_yd,
        K: tl.constexpr, USE_PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # y[t, d-tile] = sum over the K slots of token t and their n_f partials, in a fixed order.
        if USE_PDL:
            gdc_wait()
        t = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < D
        acc_D = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(K):
            base = part_ptr + (t * K + j) * N_F * D
            for n0 in range(0, N_F, BLOCK_N):
                mask_n = offs_n < N_F - n0
                p_ND = tl.load(base + (n0 + offs_n)[:, None] * D + offs_d[None, :],
                               mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                acc_D += tl.sum(p_ND, axis=0)
        tl.store(y_ptr + t * stride_yt + offs_d * stride_yd, acc_D.to(y_ptr.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _decode_gridsync_kernel(
        x_ptr, w_in_ptr, w_out_ptr, ids_ptr, slot_of_expert_ptr, weights_ptr, h_ptr, y_ptr, sync_ptr,
        D, F, N1, N_F, N2, N_D,
        stride_xt, stride_xd, stride_wis, stride_wif, stride_wid, stride_wos, stride_wod, stride_wof,
        stride_yt, stride_yd,
        K: tl.constexpr, HAS_SLOT_MAP: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
        USE_PDL: tl.constexpr, PHASE: tl.constexpr, MAX_SPIN: tl.constexpr,
        BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, BLOCK_FO: tl.constexpr,
        F_LINES: tl.constexpr, LINE: tl.constexpr,
    ):
        # The whole decode FFN in one launch of G programs, all resident at once. Each program first asks
        # L2 for its phase-2 tile, W_out[s, d-tile, :] (prefetch: no registers held), then computes phase-1
        # tiles h[r, f-tile] = act(W_in[s, f-tile, :] @ x[t]) (tiles pid, pid + G, ...) and stores them,
        # meets every other program at a grid barrier, and finishes y[t, d-tile] = sum_j w[r] *
        # W_out-tile @ h[r] (fixed order) from L2. Both weight matrices stream from HBM at once, in one launch.
        # The barrier needs every program resident (the launcher keeps G <= #SM, one program per SM) and one such
        # launch at a time per sync buffer (calls on one stream are ordered; with PDL a launch passes
        # gdc_wait only after the previous grid has finished). sync: [count, generation, timeouts].
        # PHASE 1 / 2 run the halves as two launches with no barrier: Triton's interpreter runs programs
        # one after another, where a barrier would never open (tests use it; the GPU runs PHASE 0).
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        pid = tl.program_id(0)
        G = tl.num_programs(0)
        # phase-2 tile of this program: token t, rows d-tile (programs past the last tile store nothing)
        t = tl.minimum(pid // N_D, N2 // N_D - 1)
        offs_do = (pid % N_D) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        mask2 = (offs_do < D) & (offs_do * 0 + pid < N2)  # (a block-shaped test: the interpreter wants one)
        if PHASE == 0:
            _prefetch_w_out_rows(w_out_ptr, ids_ptr, slot_of_expert_ptr, t, offs_do, D, F, stride_wos, stride_wod,
                                 stride_wof, K, HAS_SLOT_MAP, F_LINES, LINE)
        if PHASE != 2:
            for i in range(pid, N1, G):
                _h_tile(x_ptr, w_in_ptr, ids_ptr, slot_of_expert_ptr, h_ptr, i // N_F, i % N_F, D, F, stride_xt,
                        stride_xd, stride_wis, stride_wif, stride_wid, K, HAS_SLOT_MAP, ACT, GATED, BLOCK_D, BLOCK_F,
                        x_ptr, 0, 0, False)
        if PHASE == 0:  # grid barrier (sense by generation number)
            gen = tl.load(sync_ptr + 1, volatile=True)
            arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel")  # releases this program's h stores
            if arrived == G - 1:  # the last one: reset the count, open the barrier
                tl.atomic_xchg(sync_ptr, 0, sem="relaxed")
                tl.atomic_xchg(sync_ptr + 1, gen + 1, sem="release")
            else:
                spins = 0
                cur = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
                while (cur == gen) & (spins < MAX_SPIN):
                    cur = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
                    spins += 1
                if cur == gen:  # never on a GPU that holds the grid; counted, so a check can see it
                    tl.atomic_add(sync_ptr + 2, 1, sem="relaxed")
        if PHASE != 1:
            offs_fo = tl.arange(0, BLOCK_FO)
            acc_D = tl.zeros([BLOCK_DO], dtype=tl.float32)
            for j in tl.static_range(K):
                r = t * K + j
                slot = _slot_of(ids_ptr, slot_of_expert_ptr, r, HAS_SLOT_MAP)
                wo_ptrs = (w_out_ptr + slot.to(tl.int64) * stride_wos + offs_do[:, None] * stride_wod
                           + offs_fo[None, :] * stride_wof)
                h_ptrs = h_ptr + r * F + offs_fo
                part_D = tl.zeros([BLOCK_DO], dtype=tl.float32)
                for f0 in range(0, F, BLOCK_FO):
                    mask_fo = offs_fo < F - f0
                    # .cg: from L2, where the other programs' h stores are (L1 is not coherent)
                    h_F = tl.load(h_ptrs, mask=mask_fo, other=0.0, cache_modifier=".cg").to(tl.float32)
                    wo_DF = tl.load(wo_ptrs, mask=mask2[:, None] & mask_fo[None, :], other=0.0,
                                    eviction_policy="evict_first")
                    part_D += tl.sum(wo_DF.to(tl.float32) * h_F[None, :], axis=1)
                    h_ptrs += BLOCK_FO
                    wo_ptrs += BLOCK_FO * stride_wof
                acc_D += tl.load(weights_ptr + r).to(tl.float32) * part_D
            tl.store(y_ptr + t * stride_yt + offs_do * stride_yd, acc_D.to(y_ptr.dtype.element_ty), mask=mask2)

    @triton.jit(do_not_specialize=["R"])
    def _grouped_in_kernel(
        x_ptr, w_in_ptr, sorted_ptr, tile_slot_ptr, h_ptr, s_ptr,
        R, D, F,
        stride_xt, stride_xd, stride_ws, stride_wf, stride_wd, stride_hp, stride_ss, stride_sf,
        K: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr,
    ):
        # h[p, n-tile] = act(x[t_p] @ W_in[s]^T) for the BLOCK_M grouped positions p of one tile, all of
        # slot s. Rows are gathered from x through sorted_ids; padding rows load zeros and are not stored.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        slot = tl.load(tile_slot_ptr + pid_m)
        if slot < 0:  # the tile table is sized from shapes alone; tiles past the last segment are idle
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        r_M = tl.load(sorted_ptr + offs_m)
        mask_m = r_M < R
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_n = offs_n < F
        x_ptrs = x_ptr + (r_M // K)[:, None] * stride_xt + offs_k[None, :] * stride_xd
        w_ptrs = (w_in_ptr + slot.to(tl.int64) * stride_ws
                  + offs_n[None, :] * stride_wf + offs_k[:, None] * stride_wd)
        acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            mask_k = offs_k < D - k0
            x_MK = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if HAS_SCALE:  # int8 weights: exact in x's dtype (via fp32: the interpreter's direct cast
                # to bf16 is wrong); the per-row scales apply after the sum
                w_KN = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32).to(x_MK.dtype)
            else:
                x_MK = x_MK.to(w_in_ptr.dtype.element_ty)
                w_KN = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if FP32_DOT:
                acc_MN = tl.dot(x_MK.to(tl.float32), w_KN.to(tl.float32), acc_MN, input_precision="ieee")
            else:
                acc_MN = tl.dot(x_MK, w_KN, acc_MN)
            if GATED:
                u_KN = tl.load(w_ptrs + F * stride_wf, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                if HAS_SCALE:
                    u_KN = u_KN.to(tl.float32).to(x_MK.dtype)
                if FP32_DOT:
                    up_MN = tl.dot(x_MK.to(tl.float32), u_KN.to(tl.float32), up_MN, input_precision="ieee")
                else:
                    up_MN = tl.dot(x_MK, u_KN, up_MN)
            x_ptrs += BLOCK_K * stride_xd
            w_ptrs += BLOCK_K * stride_wd
        if HAS_SCALE:
            s_N = s_ptr + slot.to(tl.int64) * stride_ss + offs_n * stride_sf
            acc_MN *= tl.load(s_N, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if GATED:
                up_MN *= tl.load(s_N + F * stride_sf, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_MN = acc_MN.to(h_ptr.dtype.element_ty).to(tl.float32)
        up_MN = up_MN.to(h_ptr.dtype.element_ty).to(tl.float32)
        h_MN = _activate(acc_MN, up_MN, ACT, GATED)
        h_ptrs = h_ptr + offs_m[:, None] * stride_hp + offs_n[None, :]
        tl.store(h_ptrs, h_MN.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit(do_not_specialize=["R"])
    def _grouped_out_kernel(
        h_ptr, w_out_ptr, sorted_ptr, tile_slot_ptr, weights_ptr, out_ptr, s_ptr,
        R, D, F,
        stride_hp, stride_ws, stride_wd, stride_wf, stride_or, stride_od, stride_ss, stride_sd,
        FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_SCALE: tl.constexpr,
    ):
        # out[r_p, n-tile] = w[r_p] * h[p] @ W_out[s]^T, scattered back to token-slot order (rows r_p are
        # distinct, so plain stores suffice).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        slot = tl.load(tile_slot_ptr + pid_m)
        if slot < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        r_M = tl.load(sorted_ptr + offs_m)
        mask_m = r_M < R
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_n = offs_n < D
        h_ptrs = h_ptr + offs_m[:, None] * stride_hp + offs_k[None, :]
        w_ptrs = (w_out_ptr + slot.to(tl.int64) * stride_ws
                  + offs_n[None, :] * stride_wd + offs_k[:, None] * stride_wf)
        acc_MN = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            mask_k = offs_k < F - k0
            h_MK = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w_KN = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if HAS_SCALE:  # int8 weights: exact in h's dtype
                w_KN = w_KN.to(tl.float32).to(h_MK.dtype)
            if FP32_DOT:
                acc_MN = tl.dot(h_MK.to(tl.float32), w_KN.to(tl.float32), acc_MN, input_precision="ieee")
            else:
                acc_MN = tl.dot(h_MK, w_KN, acc_MN)
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wf
        if HAS_SCALE:
            acc_MN *= tl.load(s_ptr + slot.to(tl.int64) * stride_ss + offs_n * stride_sd, mask=mask_n,
                              other=0.0).to(tl.float32)[None, :]
        acc_MN *= tl.load(weights_ptr + r_M, mask=mask_m, other=0.0).to(tl.float32)[:, None]
        out_ptrs = out_ptr + r_M[:, None] * stride_or + offs_n[None, :] * stride_od
        tl.store(out_ptrs, acc_MN.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ------------------------------------------------------------------------------------------------ configs
DECODE_MAX_SLOTS = 16  # default path switch (R = T*k); a tuned table entry overrides it per shape


def _np2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _decode_config(bf: int, bd: int, w: int, obd: int, obf: int, ow: int, pdl: bool = True,
                   preload: bool = False) -> dict:
    out = {"BLOCK_D": obd, "BLOCK_F": obf, "num_warps": ow}
    if preload:  # the first slot's W_out tile into registers before the wait (whole rows: BLOCK_F >= F)
        out["preload"] = True
    return {"path": "decode", "pdl": pdl, "in": {"BLOCK_F": bf, "BLOCK_D": bd, "num_warps": w}, "out": out}


def gridsync_config(d: int, F: int, bf: int = 32, bdo: int = 8, w: int = 8, pdl: bool = True) -> dict:
    """The one-launch decode kernel with a grid barrier (_decode_gridsync_kernel)."""
    return {"path": "gridsync", "pdl": pdl, "BLOCK_F": bf, "BLOCK_D": min(_np2(d), 2048), "BLOCK_DO": bdo,
            "num_warps": w}


def gridsync_candidates(d: int, F: int) -> list[dict]:
    """Grid-barrier decode configs the benchmark compares with the two-kernel decode path (T = 1)."""
    return [gridsync_config(d, F), gridsync_config(d, F, 32, 8, 4), gridsync_config(d, F, 16, 8, 8),
            gridsync_config(d, F, 64, 16, 8)]


_SYNC: dict[tuple[str, int | None], torch.Tensor] = {}


def _sync_buffer(device: torch.device) -> torch.Tensor:
    """The grid barrier's [count, generation, timeouts] (int32) of a device, made once (outside any graph
    capture, at the first eager call) and left at count 0 by every launch."""
    key = (device.type, device.index)
    if key not in _SYNC:
        _SYNC[key] = torch.zeros(3, dtype=torch.int32, device=device)
    return _SYNC[key]


def gridsync_timeouts(device: torch.device) -> int:
    """How many programs left a grid barrier by its spin limit instead of by the barrier opening (a
    correctness check: must stay 0)."""
    buf = _SYNC.get((device.type, device.index))
    return 0 if buf is None else int(buf[2])


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _fused_config(bf: int, d: int, w: int = 4, pdl: bool = True, red_bd: int = 64) -> dict:
    """The fused decode kernel (one launch per token slot and F tile) and its fixed-order reduce (red_bd: output
    columns per reduce program)."""
    bd = min(_np2(d), 2048)
    return {"path": "fused", "pdl": pdl, "BLOCK_F": bf, "BLOCK_D": bd, "BLOCK_DO": bd,
            "num_warps": w, "red": {"BLOCK_N": 64, "BLOCK_D": red_bd, "num_warps": 4}}


def fused_candidates(d: int) -> list[dict]:
    """Fused decode configs the benchmark compares with the two-kernel decode path."""
    return [_fused_config(16, d), _fused_config(8, d), _fused_config(32, d, 8), _fused_config(16, d, 8)]


def _default_config(R: int, E: int, d: int, F: int, gated: bool = False, w_bytes: int = 2) -> dict:
    if R <= DECODE_MAX_SLOTS:
        # Whole rows per load (one memory round trip per program) and enough programs to fill the GPU.
        return _decode_config(8, min(_np2(d), 2048), 4, 2, min(_np2(F), 4096), 4)
    per_slot = R / min(E, R)  # mean token slots per used expert: how tall the tiles can usefully be
    # (From the H200 sweep: 16-row tiles while a tile would be mostly padding, 64 once slots are full.)
    bm = 16 if per_slot <= 8 else 32 if per_slot <= 24 else 64
    gemm = {"BLOCK_N": 64 if bm == 16 else 128, "BLOCK_K": 64, "num_warps": 4,
            "num_stages": 4 if bm == 16 else 3}
    gemm_in = dict(gemm)
    # Pipelined stages of the x tile and 1 or 2 (gated) weight tiles within ~200 KB of shared memory.
    while gemm_in["num_stages"] * 64 * (bm + (2 if gated else 1) * gemm_in["BLOCK_N"]) * w_bytes > 200_000:
        if gemm_in["num_stages"] > 2:
            gemm_in["num_stages"] -= 1
        else:
            gemm_in["BLOCK_N"] //= 2
    return {"path": "prefill", "BLOCK_M": bm, "in": gemm_in, "out": dict(gemm)}


def _candidates(R: int, E: int, d: int, F: int) -> list[dict]:
    out = []
    if R <= 64:
        bd, bf = min(_np2(d), 2048), min(_np2(F), 4096)
        for ins in ((4, bd, 4), (8, bd, 4), (16, bd, 8), (16, 256, 4)):
            for outs in ((2, bf, 4), (4, bf, 8), (8, 1024, 4)):
                out.append(_decode_config(*ins, *outs))
        out.append(_decode_config(8, bd, 4, 2, bf, 4, pdl=False))
    if R >= 4:
        for bm, bn, bk, w, st in ((16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4),
                                  (32, 128, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 4),
                                  (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)):
            if bm <= 2 * _np2(max(1, R // min(E, R))) or bm == 16:
                gemm = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}
                out.append({"path": "prefill", "BLOCK_M": bm, "in": dict(gemm), "out": dict(gemm)})
    return out


# ----------------------------------------------------------------------------------------------- launcher
def expert_ffn_triton(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    slot_of_expert: torch.Tensor | None = None,
    activation: str = "relu",
    config: dict | None = None,
    config_tokens: int | None = None,
) -> torch.Tensor:
    """Triton expert FFN (see `expert_ffn`); `config` forces a path/tiles (tests, benchmarks).

    Without `config` the path and tiles come from `choose_config`, keyed by the number of experts E
    (slot_of_expert's length when given, else the number of weight slots) and the token count
    (`config_tokens` when given: a call computing part of a larger batch's tokens takes the whole
    batch's config, so each token's output is the one the whole call would give)."""
    if activation not in _ACT_CODE:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    act, gated = _ACT_CODE[activation]
    quant = _quantized(w_in, w_out)
    if quant:
        (w_in, s_in), (w_out, s_out) = w_in, w_out
        if w_in.dtype != torch.int8 or w_out.dtype != torch.int8 or s_in.shape != w_in.shape[:2] \
                or s_out.shape != w_out.shape[:2]:
            raise ValueError(f"Int8Weights: q must be int8 [S, R, C] with scale [S, R]; got w_in {w_in.dtype} "
                             f"{tuple(w_in.shape)} / {tuple(s_in.shape)}, w_out {w_out.dtype} {tuple(w_out.shape)} / "
                             f"{tuple(s_out.shape)}")
    else:
        s_in = s_out = x  # any pointer when unused
    T, d = x.shape
    S, F_in, _ = w_in.shape
    F = w_out.shape[2]
    if F_in != (2 * F if gated else F) or w_out.shape[:2] != (S, d) or w_in.shape[2] != d:
        shapes = f"x {tuple(x.shape)}, w_in {tuple(w_in.shape)}, w_out {tuple(w_out.shape)}"
        raise ValueError(f"bad shapes for {activation}: {shapes}")
    k = ids.shape[1]
    R = T * k
    y = torch.empty((T, d), dtype=x.dtype, device=x.device)
    if R == 0:
        return y
    ids_R = ids.reshape(-1).contiguous()
    weights_R = weights.reshape(-1).contiguous()
    slot_map = slot_of_expert if slot_of_expert is not None else ids_R  # any pointer when unused
    # int8 weights: h in x's dtype, and the GEMMs take the int8 tiles converted (exactly) to it
    h_dtype = x.dtype if quant else w_in.dtype
    dot_fp32 = fp32_dot(x.dtype if quant else w_in.dtype)
    scale_args = (s_in.stride(0), s_in.stride(1)) if quant else (0, 0)
    scale_out_args = (s_out.stride(0), s_out.stride(1)) if quant else (0, 0)

    def launch(cfg: dict, out: torch.Tensor) -> None:
        if quant and cfg["path"] in ("gridsync", "fused"):
            raise ValueError(f"int8 weights: the {cfg['path']} path does not read them; use decode or prefill")
        if cfg["path"] == "gridsync":
            bf, bdo = cfg["BLOCK_F"], cfg["BLOCK_DO"]
            n_f, n_d = triton.cdiv(F, bf), triton.cdiv(d, bdo)
            N1, N2 = R * n_f, T * n_d
            interp = not x.is_cuda
            n_sm = None if interp else _sm_count(x.device)
            G = max(N1, N2) if interp else max(N2, min(N1, n_sm))
            if not interp and G > n_sm:
                raise ValueError(f"gridsync config {cfg}: {T} token(s) x {n_d} row tiles = {N2} programs, more "
                                 f"than the {n_sm} multiprocessors that must hold them at once; raise BLOCK_DO")
            pdl = {"launch_pdl": True} if cfg.get("pdl", True) and use_pdl(x.device) else {}
            h = torch.empty((R, F), dtype=h_dtype, device=x.device)
            args = (x, w_in, w_out, ids_R, slot_map, weights_R, h, out, _sync_buffer(x.device),
                    d, F, N1, n_f, N2, n_d,
                    x.stride(0), x.stride(1), w_in.stride(0), w_in.stride(1), w_in.stride(2),
                    w_out.stride(0), w_out.stride(1), w_out.stride(2), out.stride(0), out.stride(1))
            line = 128 // w_out.element_size()  # elements per 128-byte line, for the L2 prefetch
            meta = dict(K=k, HAS_SLOT_MAP=slot_of_expert is not None, ACT=act, GATED=gated, USE_PDL=bool(pdl),
                        MAX_SPIN=1 << 21, BLOCK_F=bf, BLOCK_D=cfg["BLOCK_D"], BLOCK_DO=bdo,
                        BLOCK_FO=min(cfg.get("BLOCK_FO", 1024), _np2(F)), F_LINES=_np2(triton.cdiv(F, line)),
                        LINE=line, num_warps=cfg["num_warps"], **pdl)
            for phase in ((1, 2) if interp else (0,)):
                _decode_gridsync_kernel[(G,)](*args, PHASE=phase, **meta)
            return
        if cfg["path"] == "fused":
            pdl = {"launch_pdl": True} if cfg.get("pdl", True) and use_pdl(x.device) else {}
            bf = cfg["BLOCK_F"]
            n_f = triton.cdiv(F, bf)
            part = torch.empty((R, n_f, d), dtype=torch.float32, device=x.device)
            _decode_fused_kernel[(R, n_f)](
                x, w_in, w_out, ids_R, slot_map, weights_R, part,
                d, F,
                x.stride(0), x.stride(1), w_in.stride(0), w_in.stride(1), w_in.stride(2),
                w_out.stride(0), w_out.stride(1), w_out.stride(2),
                K=k, HAS_SLOT_MAP=slot_of_expert is not None, ACT=act, GATED=gated, USE_PDL=bool(pdl),
                BLOCK_F=bf, BLOCK_D=cfg["BLOCK_D"], BLOCK_DO=cfg["BLOCK_DO"],
                num_warps=cfg["num_warps"], **pdl,
            )
            red = cfg.get("red", {"BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4})
            _decode_reduce_kernel[(T, triton.cdiv(d, red["BLOCK_D"]))](
                part, out, d, n_f, out.stride(0), out.stride(1),
                K=k, USE_PDL=bool(pdl), BLOCK_N=min(red["BLOCK_N"], _np2(n_f)), BLOCK_D=red["BLOCK_D"],
                num_warps=red["num_warps"], **pdl,
            )
            return
        if cfg["path"] == "decode":
            ci, co = cfg["in"], cfg["out"]
            h = torch.empty((R, F), dtype=h_dtype, device=x.device)
            pdl = {"launch_pdl": True} if cfg.get("pdl", True) and use_pdl(x.device) else {}
            _decode_in_kernel[(R, triton.cdiv(F, ci["BLOCK_F"]))](
                x, w_in, ids_R, slot_map, h, s_in,
                d, F,
                x.stride(0), x.stride(1), w_in.stride(0), w_in.stride(1), w_in.stride(2), *scale_args,
                K=k, HAS_SLOT_MAP=slot_of_expert is not None, ACT=act, GATED=gated, USE_PDL=bool(pdl),
                BLOCK_F=ci["BLOCK_F"], BLOCK_D=ci["BLOCK_D"], HAS_SCALE=quant, num_warps=ci["num_warps"], **pdl,
            )
            line = 128 // w_out.element_size()  # elements per 128-byte line, for the L2 prefetch
            _decode_out_kernel[(T, triton.cdiv(d, co["BLOCK_D"]))](
                h, w_out, ids_R, slot_map, weights_R, out, s_out,
                d, F,
                w_out.stride(0), w_out.stride(1), w_out.stride(2), out.stride(0), out.stride(1), *scale_out_args,
                K=k, HAS_SLOT_MAP=slot_of_expert is not None, USE_PDL=bool(pdl),
                BLOCK_D=co["BLOCK_D"], BLOCK_F=co["BLOCK_F"], F_LINES=_np2(triton.cdiv(F, line)), LINE=line,
                HAS_SCALE=quant, PRELOAD=bool(co.get("preload", False)) and co["BLOCK_F"] >= F,
                num_warps=co["num_warps"], **pdl,
            )
            return
        bm, ci, co = cfg["BLOCK_M"], cfg["in"], cfg["out"]
        grouping = group_by_slot(ids_R.view(T, k), S, bm, slot_of_expert)
        n_tiles = grouping.tile_slot.numel()
        h = torch.empty((n_tiles * bm, F), dtype=h_dtype, device=x.device)
        _grouped_in_kernel[(n_tiles, triton.cdiv(F, ci["BLOCK_N"]))](
            x, w_in, grouping.sorted_ids, grouping.tile_slot, h, s_in,
            R, d, F,
            x.stride(0), x.stride(1), w_in.stride(0), w_in.stride(1), w_in.stride(2), h.stride(0), *scale_args,
            K=k, ACT=act, GATED=gated, FP32_DOT=dot_fp32,
            BLOCK_M=bm, BLOCK_N=ci["BLOCK_N"], BLOCK_K=ci["BLOCK_K"], HAS_SCALE=quant,
            num_warps=ci["num_warps"], num_stages=ci["num_stages"],
        )
        # k = 1: token slot r is token t, so rows go straight to y; k > 1: fp32 rows, then a fixed-order sum.
        rows = out if k == 1 else torch.empty((R, d), dtype=torch.float32, device=x.device)
        _grouped_out_kernel[(n_tiles, triton.cdiv(d, co["BLOCK_N"]))](
            h, w_out, grouping.sorted_ids, grouping.tile_slot, weights_R, rows, s_out,
            R, d, F,
            h.stride(0), w_out.stride(0), w_out.stride(1), w_out.stride(2), rows.stride(0), rows.stride(1),
            *scale_out_args,
            FP32_DOT=dot_fp32, BLOCK_M=bm, BLOCK_N=co["BLOCK_N"], BLOCK_K=co["BLOCK_K"], HAS_SCALE=quant,
            num_warps=co["num_warps"], num_stages=co["num_stages"],
        )
        if k > 1:
            out.copy_(rows.view(T, k, d).sum(dim=1))

    if config is None:
        E = slot_of_expert.numel() if slot_of_expert is not None else S
        n = T if config_tokens is None else config_tokens
        config = choose_config(n, k, E, d, F, activation, x.dtype, w_in.dtype, x.device,
                               run=(lambda cfg: launch(cfg, y)) if n == T else None)
    launch(config, y)
    return y


def choose_config(
    n_tokens: int,
    k: int,
    E: int,
    d: int,
    F: int,
    activation: str,
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
    device: torch.device,
    run=None,
) -> dict:
    """The config of an expert FFN call over n_tokens tokens of a model with E experts.

    Keyed by the model's expert count and the call's token count only, never by how many weight
    slots hold the experts or how a block's tokens are split up: the offload runner's calls (a slot
    pool of any size, the encoder's experts streamed in chunks, which pass the block's token count as
    config_tokens) then take exactly the path and tiles gpu_only takes for the same tokens, and since a
    token's output depends only on the config (not on the other tokens of the call), every policy
    gives gpu_only's outputs bitwise. `run(cfg)` times a candidate (autotuning; None: no autotuning).
    """
    _, gated = _ACT_CODE[activation]
    R = n_tokens * k
    w_bytes = torch.empty((), dtype=w_dtype).element_size()
    kernel = "ffn" + ("-glu" if gated else "") + (f"-k{k}" if k > 1 else "")
    return tuning.pick(
        tuning.config_key(kernel, E, d, F, n_tokens, x_dtype, w_dtype), torch.device(device),
        default=lambda: _default_config(R, E, d, F, gated, w_bytes),
        candidates=(lambda: _candidates(R, E, d, F)) if run is not None else None, run=run,
    )


# ---------------------------------------------------------------------------------------------- reference
def expert_ffn_reference(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    slot_of_expert: torch.Tensor | None = None,
    activation: str = "relu",
) -> torch.Tensor:
    """Plain PyTorch expert FFN, grouped by slot; differentiable; output in x's dtype.

    x [T, d]; w_in [S, F, d] ([S, 2F, d] gated, gate rows first); w_out [S, d, F]; ids, weights [T, k].
    Each expert's rows are computed in the weights' dtype, scaled by the routing weight, and
    summed into the output (as transformers' Switch model does). Int8Weights are dequantized per
    slot into x's dtype first.
    """
    quant = _quantized(w_in, w_out)
    T, k = ids.shape
    slots_R = ids.reshape(-1).long()
    if slot_of_expert is not None:
        slots_R = slot_of_expert.long()[slots_R]
    token_R = torch.arange(T, device=x.device).repeat_interleave(k)
    order = torch.argsort(slots_R, stable=True)
    counts = torch.bincount(slots_R, minlength=w_in.shape[0]).tolist()
    y = torch.zeros_like(x)
    start = 0
    for s, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]
        start += n
        tok = token_R[rows]
        wi, wo = (w_in.dequantize(s, x.dtype), w_out.dequantize(s, x.dtype)) if quant else (w_in[s], w_out[s])
        h = _act(x[tok].to(wi.dtype) @ wi.t(), activation)
        out = (h @ wo.t()) * weights.reshape(-1)[rows, None].to(h.dtype)
        y = y.index_add(0, tok, out.to(x.dtype))
    return y


def expert_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    slot_of_expert: torch.Tensor | None = None,
    activation: str = "relu",
    config_tokens: int | None = None,
) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * w_out[s] @ act(w_in[s] @ x[t]), s = slot_of_expert[ids[t, j]].

    Triton on CUDA (decode or prefill path by token count), the reference otherwise (see use_triton).
    Output in x's dtype, fp32 accumulation. config_tokens: x holds part of a batch of that many tokens
    (see expert_ffn_triton); the reference computes each expert's rows alike either way.
    """
    tensors = [t.q if isinstance(t, Int8Weights) else t for t in (w_in, w_out)]
    if use_triton(x, *tensors, weights):
        return expert_ffn_triton(x, w_in, w_out, ids, weights, slot_of_expert, activation,
                                 config_tokens=config_tokens)
    return expert_ffn_reference(x, w_in, w_out, ids, weights, slot_of_expert, activation)
