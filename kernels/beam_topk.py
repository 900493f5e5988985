"""Beam search's candidates in three small kernels: each prompt's top-2k of log_softmax(logits) + the running
beams' scores, over beams x vocabulary, without the log-probabilities ever written out.

Why: BeamSelect's tensor form (log_softmax, the add, torch.topk over NB * V values per prompt) is ~30 launches at the
end of every beam-search step, where nothing overlaps them: on the H200, in a captured switch-base-128 beam-4 step,
torch.topk's radix select alone took ~70 us of the step's last 146 us (bench/results/
profile-decode-compress-beam4-h200.json). Here:
    1. _lse_part_kernel, grid (R rows, NT tiles): each tile's max and sum of exp(x - max);
    2. _tile_topk_kernel, same grid: the row's log-sum-exp from its NT partials (in tile order), each value of the
       tile as (x - max) - log(sum) + score[row] (torch's log_softmax, then the add, in float32), and the tile's
       best K by (value descending, flat index ascending);
    3. _merge_topk_kernel, grid (B prompts): the best K of the prompt's NB * NT * K candidates, same order.
A value's flat index is beam * V + token, as in the tensor form's [B, NB * V] view. Ties go to the lower flat index
(torch.topk does not promise an order for them); values differ from the tensor form's by float32 rounding of the
log-sum-exp (its sum runs in another order), so near-ties may resolve differently: every policy runs the same form.
Legend: B prompts, NB beams each, R = B * NB rows, V vocabulary, K = 2 * NB candidates, T tile, NT tiles per row.
"""

from __future__ import annotations

import torch

from kernels.greedy import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _lse_part_kernel(x_ptr, part_ptr, V, stride, NT, T: tl.constexpr):
        r = tl.program_id(0)
        t = tl.program_id(1)
        offs = t * T + tl.arange(0, T)
        x = tl.load(x_ptr + r * stride + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        m_safe = tl.where(m == -float("inf"), 0.0, m)  # a tile of -inf only: sum 0, no nan
        s = tl.sum(tl.exp(x - m_safe), axis=0)
        tl.store(part_ptr + (r * NT + t) * 2, m)
        tl.store(part_ptr + (r * NT + t) * 2 + 1, s)

    @triton.jit
    def _best_k(val, idx, out_s_ptr, out_i_ptr, K: tl.constexpr):
        # the K best of (val, idx) by value descending, index ascending, written in that order (K passes)
        for k in tl.static_range(K):
            best = tl.max(val, axis=0)
            pick = tl.min(tl.where(val == best, idx, 0x7FFFFFFFFFFFFFFF), axis=0)
            tl.store(out_s_ptr + k, best)
            tl.store(out_i_ptr + k, pick)
            val = tl.where(idx == pick, -float("inf"), val)
            idx = tl.where(idx == pick, 0x7FFFFFFFFFFFFFFF, idx)

    @triton.jit
    def _tile_topk_kernel(x_ptr, part_ptr, scores_ptr, cand_s_ptr, cand_i_ptr, V, stride, NT,
                          NB: tl.constexpr, T: tl.constexpr, NTP: tl.constexpr, K: tl.constexpr):
        r = tl.program_id(0)
        t = tl.program_id(1)
        j = tl.arange(0, NTP)
        pm = tl.load(part_ptr + (r * NT + j) * 2, mask=j < NT, other=-float("inf"))
        ps = tl.load(part_ptr + (r * NT + j) * 2 + 1, mask=j < NT, other=0.0)
        big = tl.max(pm, axis=0)
        big_safe = tl.where(big == -float("inf"), 0.0, big)
        total = tl.sum(tl.where(ps > 0, ps * tl.exp(pm - big_safe), 0.0), axis=0)
        log_total = tl.log(total)
        score = tl.load(scores_ptr + r)
        offs = t * T + tl.arange(0, T)
        ok = offs < V
        x = tl.load(x_ptr + r * stride + offs, mask=ok, other=-float("inf")).to(tl.float32)
        val = ((x - big_safe) - log_total) + score
        val = tl.where(ok, val, -float("inf"))
        idx = tl.where(ok, (r % NB).to(tl.int64) * V + offs, 0x7FFFFFFFFFFFFFFF)
        base = (r * NT + t) * K
        _best_k(val, idx, cand_s_ptr + base, cand_i_ptr + base, K)

    @triton.jit
    def _merge_topk_kernel(cand_s_ptr, cand_i_ptr, top_s_ptr, top_i_ptr, C, CP: tl.constexpr, K: tl.constexpr):
        b = tl.program_id(0)
        c = tl.arange(0, CP)
        ok = c < C
        val = tl.load(cand_s_ptr + b * C + c, mask=ok, other=-float("inf"))
        idx = tl.load(cand_i_ptr + b * C + c, mask=ok, other=0x7FFFFFFFFFFFFFFF)
        idx = tl.where(ok, idx, 0x7FFFFFFFFFFFFFFF)
        _best_k(val, idx, top_s_ptr + b * K, top_i_ptr + b * K, K)


TILE = 1024  # vocabulary entries per program


def beam_topk_reference(logits: torch.Tensor, scores: torch.Tensor, num_beams: int, k: int):
    """The tensor form (BeamSelect's before the kernels): (top_s [B, k] float32, top_i [B, k] int64)."""
    R, V = logits.shape
    cand = (torch.log_softmax(logits, dim=-1) + scores.reshape(-1, 1)).view(R // num_beams, num_beams * V)
    return cand.topk(k, dim=1)


def beam_topk(logits: torch.Tensor, scores: torch.Tensor, num_beams: int, k: int,
              out: tuple[torch.Tensor, torch.Tensor] | None = None, tile: int = TILE):
    """Each prompt's best k of log_softmax(logits) + scores over its beams x vocabulary, by the three kernels above:
    logits [B * num_beams, V] (float; rows contiguous), scores [B * num_beams] (float32, the running beams' sums)
    -> (top_s [B, k] float32, top_i [B, k] int64 flat indices beam * V + token), best first, ties to the lower
    index. `out`: buffers to write (a captured step's static ones). No host synchronisation."""
    R, V = logits.shape
    if R % num_beams or k > num_beams * V or logits.stride(1) != 1:
        raise ValueError(f"beam_topk: logits [{R}, {V}] (unit stride along V) for {num_beams} beams, k = {k}")
    if tile & (tile - 1) or tile < k:
        raise ValueError(f"beam_topk: tile must be a power of two >= k, got {tile}")
    B, NT = R // num_beams, triton.cdiv(V, tile)
    dev = logits.device
    part = torch.empty((R, NT, 2), dtype=torch.float32, device=dev)
    cand_s = torch.empty((R, NT, k), dtype=torch.float32, device=dev)
    cand_i = torch.empty((R, NT, k), dtype=torch.int64, device=dev)
    top_s, top_i = out if out is not None else (torch.empty((B, k), dtype=torch.float32, device=dev),
                                                torch.empty((B, k), dtype=torch.int64, device=dev))
    scores = scores.reshape(-1).float().contiguous()
    _lse_part_kernel[(R, NT)](logits, part, V, logits.stride(0), NT, T=tile, num_warps=4)
    _tile_topk_kernel[(R, NT)](logits, part, scores, cand_s, cand_i, V, logits.stride(0), NT, NB=num_beams, T=tile,
                               NTP=triton.next_power_of_2(NT), K=k, num_warps=4)
    C = num_beams * NT * k
    _merge_topk_kernel[(B,)](cand_s, cand_i, top_s, top_i, C, CP=triton.next_power_of_2(C), K=k, num_warps=8)
    return top_s, top_i
