"""Routing: gate logits -> softmax -> top-k in one Triton kernel, and the grouping of token slots by weight
slot that the prefill expert FFN runs on. Each beside its plain-PyTorch reference.

Legend: T tokens, d model width, E experts, G stacked gates, k experts per token, R = T*k token slots,
S weight slots, M rows per tile of the grouped GEMM (BLOCK_M), P grouped positions (a multiple of M).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from kernels import tuning

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAVE_TRITON = True
except ImportError:  # CPU-only installs without triton: the references still work
    HAVE_TRITON = False


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton on CUDA tensors; on CPU only under the interpreter with PGMOE_FORCE_TRITON=1 (tests).

    Inputs that need a gradient always take the (differentiable) reference.
    """
    if not HAVE_TRITON:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    if tensors[0].is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("PGMOE_FORCE_TRITON") == "1"


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper+): a kernel may start while the previous one finishes and
    waits (gdc_wait) only before reading what that one wrote. Off on CPU and with PGMOE_PDL=0."""
    return device.type == "cuda" and os.environ.get("PGMOE_PDL", "1") == "1" and _sm_major(device.index) >= 9


@functools.cache
def _sm_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def fp32_dot(*dtypes: torch.dtype) -> bool:
    """Whether tl.dot runs on fp32 operands: fp32 or mixed inputs, and always under the interpreter,
    whose bf16 dot is wrong (triton 3.9; bf16 products are exact in fp32, so the result is the same)."""
    return os.environ.get("TRITON_INTERPRET") == "1" or any(dt == torch.float32 for dt in dtypes) or \
        len(set(dtypes)) > 1


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ----------------------------------------------------------------------------------------------- routing
if HAVE_TRITON:

    @triton.jit
    def _softmax_topk_store(logits_TE, mask_t, offs_e, mask_e, ids_ptr, probs_ptr, out_offs,
                            K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_E: tl.constexpr):
        # Softmax over the experts, then top-k by k rounds of (max, lowest index holding it): ties go to
        # the lower expert index. Writes ids and probabilities of tokens offs_t at out_offs + j.
        logits_TE = tl.where(mask_e[None, :], logits_TE, float("-inf"))
        row_max = tl.max(logits_TE, axis=1)
        p_TE = tl.exp(logits_TE - row_max[:, None])
        p_TE = p_TE / tl.sum(p_TE, axis=1)[:, None]
        p_TE = tl.where(mask_e[None, :], p_TE, -1.0)  # padding experts are never picked
        denom = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
        if RENORMALIZE:
            denom = tl.zeros([BLOCK_T], dtype=tl.float32)
            left_TE = p_TE
            for _ in tl.static_range(K):
                top = tl.max(left_TE, axis=1)
                idx = tl.min(tl.where(left_TE == top[:, None], offs_e[None, :], BLOCK_E), axis=1)
                denom += top
                left_TE = tl.where(offs_e[None, :] == idx[:, None], -2.0, left_TE)
        left_TE = p_TE
        for j in tl.static_range(K):
            top = tl.max(left_TE, axis=1)
            idx = tl.min(tl.where(left_TE == top[:, None], offs_e[None, :], BLOCK_E), axis=1)
            tl.store(ids_ptr + out_offs + j, idx.to(tl.int32), mask=mask_t)
            tl.store(probs_ptr + out_offs + j, top / denom, mask=mask_t)
            left_TE = tl.where(offs_e[None, :] == idx[:, None], -2.0, left_TE)

    @triton.jit(do_not_specialize=["T"])
    def _route_kernel(
        x_ptr, w_ptr, ids_ptr, probs_ptr,
        T, D, E,
        stride_xt, stride_xd, stride_wg, stride_we, stride_wd, stride_og,
        K: tl.constexpr, RENORMALIZE: tl.constexpr, FP32_DOT: tl.constexpr, USE_PDL: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program: BLOCK_T tokens x all E experts of gate g. The logits tile stays in registers, so
        # softmax and top-k cost no extra pass over memory; the gate is read once per token block.
        if USE_PDL:  # x comes from the previous kernel; the expert FFN's first kernel may start now
            gdc_wait()
            gdc_launch_dependents()
        pid_t = tl.program_id(0)
        g = tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_e = tl.arange(0, BLOCK_E)
        offs_d = tl.arange(0, BLOCK_D)
        mask_t = offs_t < T
        mask_e = offs_e < E
        x_ptrs = x_ptr + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd
        w_ptrs = w_ptr + g * stride_wg + offs_e[None, :] * stride_we + offs_d[:, None] * stride_wd
        logits_TE = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask_d = offs_d < D - d0
            x_TD = tl.load(x_ptrs, mask=mask_t[:, None] & mask_d[None, :], other=0.0)
            w_DE = tl.load(w_ptrs, mask=mask_d[:, None] & mask_e[None, :], other=0.0)
            if FP32_DOT:  # fp32 or mixed inputs: exact fp32 products, no tf32 (logits must be fp32)
                x_TD, w_DE = x_TD.to(tl.float32), w_DE.to(tl.float32)
                logits_TE = tl.dot(x_TD, w_DE, logits_TE, input_precision="ieee")
            else:  # bf16/fp16 x bf16/fp16: the products are exact in the fp32 accumulator
                logits_TE = tl.dot(x_TD, w_DE, logits_TE)
            x_ptrs += BLOCK_D * stride_xd
            w_ptrs += BLOCK_D * stride_wd

        _softmax_topk_store(logits_TE, mask_t, offs_e, mask_e, ids_ptr, probs_ptr,
                            g * stride_og + offs_t * K, K, RENORMALIZE, BLOCK_T, BLOCK_E)

    @triton.jit(do_not_specialize=["T", "D_CHUNK"])
    def _route_split_kernel(
        x_ptr, w_ptr, part_ptr, count_ptr, ids_ptr, probs_ptr,
        T, D, E, D_CHUNK,
        stride_xt, stride_xd, stride_wg, stride_we, stride_wd, stride_og,
        K: tl.constexpr, RENORMALIZE: tl.constexpr, FP32_DOT: tl.constexpr, USE_PDL: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, TILE_E: tl.constexpr, SPLIT_D: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Small T (one token block): the gate read is spread over cdiv(E, TILE_E) * SPLIT_D programs of
        # gate g, each computing partial logits of TILE_E experts over one d chunk into part [G, SPLIT_D,
        # BLOCK_T, BLOCK_E] (fp32). The last program to finish (an atomic counter per gate, which it
        # resets to 0) sums the SPLIT_D chunks in a fixed order, so the result is deterministic, and
        # does the softmax and top-k. One launch, no host sync; CUDA-graph capturable.
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
        pid = tl.program_id(0)
        g = tl.program_id(1)
        n_e = tl.cdiv(E, TILE_E)
        pid_e = pid % n_e
        pid_d = pid // n_e
        offs_t = tl.arange(0, BLOCK_T)
        offs_te = pid_e * TILE_E + tl.arange(0, TILE_E)
        offs_d = tl.arange(0, BLOCK_D)
        mask_t = offs_t < T
        mask_te = offs_te < E
        d_lo = pid_d * D_CHUNK
        d_hi = tl.minimum(D, d_lo + D_CHUNK)
        x_ptrs = x_ptr + offs_t[:, None] * stride_xt + (d_lo + offs_d)[None, :] * stride_xd
        w_ptrs = w_ptr + g * stride_wg + offs_te[None, :] * stride_we + (d_lo + offs_d)[:, None] * stride_wd
        logits_TE = tl.zeros([BLOCK_T, TILE_E], dtype=tl.float32)
        for d0 in range(d_lo, d_hi, BLOCK_D):
            mask_d = offs_d < d_hi - d0
            x_TD = tl.load(x_ptrs, mask=mask_t[:, None] & mask_d[None, :], other=0.0)
            w_DE = tl.load(w_ptrs, mask=mask_d[:, None] & mask_te[None, :], other=0.0)
            if FP32_DOT:
                x_TD, w_DE = x_TD.to(tl.float32), w_DE.to(tl.float32)
                logits_TE = tl.dot(x_TD, w_DE, logits_TE, input_precision="ieee")
            else:
                logits_TE = tl.dot(x_TD, w_DE, logits_TE)
            x_ptrs += BLOCK_D * stride_xd
            w_ptrs += BLOCK_D * stride_wd
        part_g = part_ptr + g * (SPLIT_D * BLOCK_T * BLOCK_E)
        tl.store(part_g + pid_d * (BLOCK_T * BLOCK_E) + offs_t[:, None] * BLOCK_E + offs_te[None, :], logits_TE)
        tl.debug_barrier()  # every thread's stores precede the release below
        done = tl.atomic_add(count_ptr + g, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(0) - 1:  # the last program of gate g: all partial logits are written
            offs_e = tl.arange(0, BLOCK_E)
            ptrs = part_g + offs_t[:, None] * BLOCK_E + offs_e[None, :]
            logits = tl.load(ptrs, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_D):
                logits += tl.load(ptrs + s * (BLOCK_T * BLOCK_E), cache_modifier=".cg")
            _softmax_topk_store(logits, mask_t, offs_e, offs_e < E, ids_ptr, probs_ptr,
                                g * stride_og + offs_t * K, K, RENORMALIZE, BLOCK_T, BLOCK_E)
            tl.store(count_ptr + g, 0)  # ready for the next launch


SPLIT_MIN_GATE_BYTES = 64 << 10  # default: split the gate read at small T once a gate is this large


def _route_default(T: int, E: int, d: int, x_bytes: int = 2, w_bytes: int = 2) -> dict:
    block_e = max(16, _next_pow2(E))
    block_t = 16 if T <= 16 or block_e >= 256 else (32 if T <= 512 else 64)
    if T <= 16 and E * d * w_bytes >= SPLIT_MIN_GATE_BYTES:
        # One program's bandwidth bounds the whole-gate read at small T: ~16 KB of gate per program.
        tile_e = min(block_e, 32)
        n_e = -(-E // tile_e)
        split = max(1, min(8, _next_pow2(max(1, E * d * w_bytes // (16 << 10) // n_e))))
        return {"BLOCK_T": 16, "BLOCK_D": 64, "TILE_E": tile_e, "SPLIT_D": split, "num_warps": 4,
                "num_stages": 3}
    # ~16K elements of gate per iteration: enough bytes in flight for one SM at small T; and the
    # 3 pipelined stages of x and gate tiles within ~200 KB of shared memory (fp32 gates: half).
    block_d = max(16, min(_next_pow2(d), 16384 // block_e))
    while block_d > 16 and 3 * block_d * (block_t * x_bytes + block_e * w_bytes) > 200_000:
        block_d //= 2
    return {"BLOCK_T": block_t, "BLOCK_D": block_d, "num_warps": 4, "num_stages": 3}


def _route_candidates(T: int, E: int, d: int, x_bytes: int, w_bytes: int) -> list[dict]:
    default = _route_default(T, E, d, x_bytes, w_bytes)
    if "SPLIT_D" in default:  # and the whole-gate kernel, as tuned before the split existed
        whole = _route_default(17, E, d, x_bytes, w_bytes) | {"BLOCK_T": 16}
        return [default, {**default, "SPLIT_D": max(1, default["SPLIT_D"] // 2)},
                {**default, "SPLIT_D": min(16, default["SPLIT_D"] * 2)},
                {**default, "TILE_E": max(16, default["TILE_E"] // 2)}, whole]
    bd = default["BLOCK_D"]
    out = [default, {**default, "BLOCK_D": max(16, bd // 2)}, {**default, "num_warps": 8, "num_stages": 4}]
    if T > 16:
        out.append({**default, "BLOCK_T": 32 if default["BLOCK_T"] == 64 else 64})
    return out


_zeroed: dict[tuple, torch.Tensor] = {}


def zeroed_buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled buffer that the kernel using it leaves zeroed again (counters of last-arriving
    programs, atomic accumulators): persistent per (name, size, dtype, device, stream), so launches on
    one stream never overlap on it. While a CUDA graph is being captured a buffer not made before
    is made by a captured fill instead (run at every replay); buffers are never freed, so captured
    graphs may keep pointing at them."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (name, numel, dtype, str(device), stream)
    buf = _zeroed.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(numel, dtype=dtype, device=device)
        buf = _zeroed[key] = torch.zeros(numel, dtype=dtype, device=device)
    return buf


def route_triton(
    x: torch.Tensor, weight: torch.Tensor, k: int = 1, renormalize: bool = False, config: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton routing (see `route`). Allocates its outputs; no host synchronization."""
    stacked = weight.dim() == 3
    w_GED = weight if stacked else weight[None]
    G, E, d = w_GED.shape
    T = x.shape[0]
    if not 1 <= k <= E:
        raise ValueError(f"k={k} must be in [1, E={E}]")
    ids_GTK = torch.empty((G, T, k), dtype=torch.int32, device=x.device)
    probs_GTK = torch.empty((G, T, k), dtype=torch.float32, device=x.device)
    if T > 0:

        def launch(cfg: dict) -> None:
            pdl = {"launch_pdl": True} if use_pdl(x.device) else {}
            common = dict(K=k, RENORMALIZE=renormalize, FP32_DOT=fp32_dot(x.dtype, w_GED.dtype),
                          USE_PDL=bool(pdl), BLOCK_T=cfg["BLOCK_T"], BLOCK_E=max(16, _next_pow2(E)),
                          BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                          **pdl)
            strides = (x.stride(0), x.stride(1), w_GED.stride(0), w_GED.stride(1), w_GED.stride(2), T * k)
            if "SPLIT_D" in cfg and T <= cfg["BLOCK_T"]:
                split, tile_e = cfg["SPLIT_D"], min(cfg["TILE_E"], common["BLOCK_E"])
                chunk = triton.cdiv(triton.cdiv(d, split), cfg["BLOCK_D"]) * cfg["BLOCK_D"]
                part = torch.empty((G, split, cfg["BLOCK_T"], common["BLOCK_E"]), dtype=torch.float32,
                                   device=x.device)
                count = zeroed_buffer("route-count", G, torch.int32, x.device)
                _route_split_kernel[(triton.cdiv(E, tile_e) * split, G)](
                    x, w_GED, part, count, ids_GTK, probs_GTK,
                    T, d, E, chunk, *strides, TILE_E=tile_e, SPLIT_D=split, **common,
                )
                return
            _route_kernel[(triton.cdiv(T, cfg["BLOCK_T"]), G)](
                x, w_GED, ids_GTK, probs_GTK, T, d, E, *strides, **common,
            )

        if config is None:
            # Mixed or fp32 inputs are upcast to fp32 tiles for the dot: size shared memory for 4 bytes.
            xb, wb = (4, 4) if fp32_dot(x.dtype, w_GED.dtype) else (x.element_size(), w_GED.element_size())
            config = tuning.pick(
                tuning.config_key("route", E, d, 0, T, x.dtype, w_GED.dtype), x.device,
                default=lambda: _route_default(T, E, d, xb, wb),
                candidates=lambda: _route_candidates(T, E, d, xb, wb),
                run=launch,
            )
        launch(config)
    return (ids_GTK, probs_GTK) if stacked else (ids_GTK[0], probs_GTK[0])


def route_reference(
    x: torch.Tensor, weight: torch.Tensor, k: int = 1, renormalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch routing. x [T, d]; weight [E, d] or [G, E, d] -> ids int32, weights fp32 [(G,) T, k].

    Logits in fp32; ties go to the lower expert index (torch.topk on CPU and CUDA keeps the first
    maximum for k=1; for k>1 a stable sort is used so the rule holds for every position).
    """
    stacked = weight.dim() == 3
    w_GED = weight if stacked else weight[None]
    logits_GTE = torch.einsum("td,ged->gte", x.float(), w_GED.float())
    probs_GTE = torch.softmax(logits_GTE, dim=-1)
    if k == 1:
        top_w, top_i = probs_GTE.max(dim=-1, keepdim=True)
    else:
        order = torch.sort(probs_GTE, dim=-1, descending=True, stable=True)
        top_w, top_i = order.values[..., :k], order.indices[..., :k]
    if renormalize:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    ids, weights = top_i.to(torch.int32), top_w.float()
    return (ids, weights) if stacked else (ids[0], weights[0])


def route(
    x: torch.Tensor, weight: torch.Tensor, k: int = 1, renormalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d], weight [E, d] or stacked [G, E, d] -> (ids int32, weights fp32), [(G,) T, k].

    Softmax over E in fp32, top-k, ties to the lower index; renormalize=True divides by the sum of the
    k picked probabilities (Mixtral), False keeps the full-softmax probability (Switch).
    """
    if use_triton(x, weight):
        return route_triton(x, weight, k=k, renormalize=renormalize)
    return route_reference(x, weight, k=k, renormalize=renormalize)


# ------------------------------------------------------------------------------------------------ grouping
class Grouping(NamedTuple):
    """Token slots grouped by weight slot, each slot's segment padded to a multiple of block_m.

    sorted_ids [P]: token-slot index r = t*k + j at each grouped position (stable: r ascending within a
    slot); padding positions hold R. tile_slot [P / block_m]: the weight slot of each M-row tile, -1 for
    tiles past the last segment. counts [S]: token slots per weight slot. offsets [S + 1]: the first
    position of each slot's segment; offsets[S] is the number of positions in use.
    P = max_tiles(R, S, block_m) * block_m is known from shapes alone, so no host sync is needed.
    """

    sorted_ids: torch.Tensor
    tile_slot: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    block_m: int


def max_tiles(R: int, S: int, block_m: int) -> int:
    # sum_s ceil(c_s / M) <= R / M + (number of non-empty slots) <= cdiv(R, M) + min(S, R)
    return -(-R // block_m) + min(S, R)


if HAVE_TRITON:

    @triton.jit
    def _slots_of_block(ids_ptr, slot_of_expert_ptr, b, R, HAS_SLOT_MAP: tl.constexpr, BLOCK_R: tl.constexpr):
        offs_r = b * BLOCK_R + tl.arange(0, BLOCK_R)
        slot_R = tl.load(ids_ptr + offs_r, mask=offs_r < R, other=-1).to(tl.int32)
        if HAS_SLOT_MAP:
            slot_R = tl.load(slot_of_expert_ptr + slot_R, mask=offs_r < R, other=-1).to(tl.int32)
        return offs_r, slot_R

    @triton.jit(do_not_specialize=["R"])
    def _group_count_kernel(
        ids_ptr, slot_of_expert_ptr, block_counts_ptr,
        R,
        HAS_SLOT_MAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        # Pass 1, one program per block of BLOCK_R token slots: how many go to each weight slot.
        b = tl.program_id(0)
        _, slot_R = _slots_of_block(ids_ptr, slot_of_expert_ptr, b, R, HAS_SLOT_MAP, BLOCK_R)
        offs_s = tl.arange(0, BLOCK_S)
        counts_S = tl.sum((slot_R[:, None] == offs_s[None, :]).to(tl.int32), axis=0)
        tl.store(block_counts_ptr + b * BLOCK_S + offs_s, counts_S)

    @triton.jit(do_not_specialize=["R", "MAX_TILES"])
    def _group_place_kernel(
        ids_ptr, slot_of_expert_ptr, block_counts_ptr, sorted_ptr, tile_slot_ptr, counts_ptr, offsets_ptr,
        R, S, MAX_TILES, NUM_BLOCKS,
        HAS_SLOT_MAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        # Pass 2, one program per block: every program reads the small [blocks, S] count table, so each
        # knows the padded segment starts and how many earlier blocks' slots precede its own; the order
        # is r ascending within a slot (stable, deterministic). Program 0 also writes the per-slot
        # counts and offsets, the padding sentinels and the tile -> slot table.
        b = tl.program_id(0)
        offs_s = tl.arange(0, BLOCK_S)
        offs_b = tl.arange(0, BLOCK_B)
        table_BS = tl.load(block_counts_ptr + offs_b[:, None] * BLOCK_S + offs_s[None, :],
                           mask=offs_b[:, None] < NUM_BLOCKS, other=0)
        counts_S = tl.sum(table_BS, axis=0)
        padded_S = (counts_S + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends_S = tl.cumsum(padded_S, axis=0)
        starts_S = ends_S - padded_S
        before_S = tl.sum(tl.where(offs_b[:, None] < b, table_BS, 0), axis=0)

        offs_r, slot_R = _slots_of_block(ids_ptr, slot_of_expert_ptr, b, R, HAS_SLOT_MAP, BLOCK_R)
        hit_RS = (slot_R[:, None] == offs_s[None, :]).to(tl.int32)
        rank_RS = tl.cumsum(hit_RS, axis=0) - hit_RS  # earlier rows of this block in the same slot
        pos_R = tl.sum(hit_RS * (starts_S + before_S)[None, :] + hit_RS * rank_RS, axis=1)
        tl.store(sorted_ptr + pos_R, offs_r, mask=(offs_r < R) & (slot_R >= 0) & (slot_R < S))

        if b == 0:
            used = tl.sum(padded_S, axis=0)
            mask_s = offs_s < S
            tl.store(counts_ptr + offs_s, counts_S, mask=mask_s)
            tl.store(offsets_ptr + offs_s, starts_S, mask=mask_s)
            tl.store(offsets_ptr + S, used)
            # Padding: the tail of each segment ([S, M] at once), then everything past the last segment.
            offs_m = tl.arange(0, BLOCK_M)
            tl.store(sorted_ptr + (starts_S + counts_S)[:, None] + offs_m[None, :], R,
                     mask=mask_s[:, None] & ((counts_S[:, None] + offs_m[None, :]) < padded_S[:, None]))
            for p0 in range(used, MAX_TILES * BLOCK_M, BLOCK_R):
                tl.store(sorted_ptr + p0 + tl.arange(0, BLOCK_R), R,
                         mask=tl.arange(0, BLOCK_R) < MAX_TILES * BLOCK_M - p0)
            # Tile i belongs to the first slot whose segment ends after it.
            tile_end_S = ends_S // BLOCK_M
            for i0 in range(0, MAX_TILES, BLOCK_R):
                offs_i = i0 + tl.arange(0, BLOCK_R)
                slot_I = tl.sum((tile_end_S[None, :] <= offs_i[:, None]).to(tl.int32), axis=1)
                tl.store(tile_slot_ptr + offs_i, tl.where(slot_I < S, slot_I, -1), mask=offs_i < MAX_TILES)


def group_by_slot(
    ids: torch.Tensor, num_slots: int, block_m: int, slot_of_expert: torch.Tensor | None = None
) -> Grouping:
    """Triton grouping of the token slots of ids [T, k] by weight slot (see `Grouping`).

    Two launches (count per block, then place); no host sync.
    """
    ids_R = ids.reshape(-1)
    if not ids_R.is_contiguous():
        ids_R = ids_R.contiguous()
    R, S = ids_R.numel(), num_slots
    n_tiles = max_tiles(R, S, block_m)
    dev = ids.device
    block_s = max(16, _next_pow2(S))
    # Blocks of rows: a [BLOCK_R, S] one-hot tile of ~8K elements, and at most 128 blocks, so the
    # [blocks, S] count table that every program reads stays small.
    block_r = max(min(128, 8192 // block_s), _next_pow2(-(-R // 128)))
    n_blocks = max(1, -(-R // block_r))
    sorted_ids = torch.empty(n_tiles * block_m, dtype=torch.int32, device=dev)
    tile_slot = torch.empty(n_tiles, dtype=torch.int32, device=dev)
    counts = torch.empty(S, dtype=torch.int32, device=dev)
    offsets = torch.empty(S + 1, dtype=torch.int32, device=dev)
    block_counts = torch.empty((n_blocks, block_s), dtype=torch.int32, device=dev)
    slot_map = slot_of_expert if slot_of_expert is not None else ids_R
    common = dict(HAS_SLOT_MAP=slot_of_expert is not None, BLOCK_R=block_r, BLOCK_S=block_s,
                  num_warps=8 if block_r * block_s >= 16384 else 4)
    _group_count_kernel[(n_blocks,)](ids_R, slot_map, block_counts, R, **common)
    _group_place_kernel[(n_blocks,)](
        ids_R, slot_map, block_counts, sorted_ids, tile_slot, counts, offsets,
        R, S, n_tiles, n_blocks,
        BLOCK_M=block_m, BLOCK_B=max(2, _next_pow2(n_blocks)), **common,
    )
    return Grouping(sorted_ids, tile_slot, counts, offsets, block_m)


def group_by_slot_reference(
    ids: torch.Tensor, num_slots: int, block_m: int, slot_of_expert: torch.Tensor | None = None
) -> Grouping:
    """Plain PyTorch `group_by_slot`: the same outputs, element for element."""
    slot_R = ids.reshape(-1).long()
    if slot_of_expert is not None:
        slot_R = slot_of_expert.long()[slot_R]
    R, S = slot_R.numel(), num_slots
    n_tiles = max_tiles(R, S, block_m)
    counts = torch.bincount(slot_R, minlength=S)
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.zeros(S + 1, dtype=torch.long, device=ids.device)
    offsets[1:] = torch.cumsum(padded, 0)
    order = torch.argsort(slot_R, stable=True)
    seg_start = torch.cumsum(counts, 0) - counts  # unpadded start of each slot in `order`
    slot_sorted = slot_R[order]
    pos = offsets[slot_sorted] + torch.arange(R, device=ids.device) - seg_start[slot_sorted]
    sorted_ids = torch.full((n_tiles * block_m,), R, dtype=torch.int32, device=ids.device)
    sorted_ids[pos] = order.to(torch.int32)
    tile = torch.arange(n_tiles, device=ids.device)
    tile_slot = torch.searchsorted(offsets[1:] // block_m, tile, right=True)
    tile_slot = torch.where(tile_slot < S, tile_slot, -1).to(torch.int32)
    return Grouping(sorted_ids, tile_slot, counts.to(torch.int32), offsets.to(torch.int32), block_m)
