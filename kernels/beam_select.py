"""Beam search's per-step update as one kernel (plus greedy's two-line `_ended_kernel`): after the log-softmax and the
top-2k of each prompt's candidates (PyTorch), one program per prompt keeps the best num_beams finished hypotheses,
picks the running beams, updates the done flag, the running sequences and the next tokens, and writes the rows the
caches are reordered from. models.generate.BeamSelect's tensor form of the same step (`beam_update_reference`) is
~50 small kernels; inside a captured decode step each costs a launch at the end of the step, where nothing
overlaps it. On the H200 (bench/results/probe-beam-select-h200.md, per step in a CUDA graph, beam 4): 84 us with this
kernel, 152 / 182 us with the tensor form (switch-base-128 / switch-large-128); the kernel is BeamSelect's default on
CUDA.

Decisions are the reference's, ties included: the kept hypotheses are the first num_beams of (kept so far, then the
new ones in candidate order) by score, equal scores in that order (a rank per entry: how many entries come before
it); the running beams are the first num_beams candidates that are not eos. Scores divided by the length penalty
in float64, as the reference does.
Legend: B prompts, NB beams per prompt, K = 2 * NB candidates per prompt, N output columns.
"""

from __future__ import annotations

import torch

from kernels.greedy import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.greedy import _ended_kernel

    @triton.jit
    def _beam_update_kernel(top_s_ptr, top_i_ptr, denom_ptr, scores_ptr, seqs_ptr, fin_s_ptr, fin_seqs_ptr,
                            fin_len_ptr, done_ptr, tok_ptr, src_ptr, t_ptr, V, N, PAD, EOS,
                            NB: tl.constexpr, K: tl.constexpr, NBP: tl.constexpr, NP: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        t = tl.load(t_ptr)
        col = t % N
        denom = tl.load(denom_ptr)
        active = tl.load(done_ptr + b) == 0
        # the combined list: NB kept hypotheses (positions 0..NB-1), then the K candidates, then padding
        j = tl.arange(0, NP)
        is_old = j < NB
        kidx = j - NB
        is_new = (j >= NB) & (kidx < K)
        ts = tl.load(top_s_ptr + b * K + kidx, mask=is_new, other=-float("inf"))
        ti = tl.load(top_i_ptr + b * K + kidx, mask=is_new, other=0)
        beam_c = ti // V
        tok_c = ti % V
        eos_c = (tok_c == EOS) & is_new
        fs_old = tl.load(fin_s_ptr + b * NB + j, mask=is_old, other=-float("inf"))
        new_ok = eos_c & (kidx < NB) & active
        comb = tl.where(is_old, fs_old, tl.where(new_ok, ts.to(tl.float64) / denom, -float("inf")))
        len_src = tl.where(is_old, tl.load(fin_len_ptr + b * NB + j, mask=is_old, other=0), t + 1)
        # rank of each entry: entries before it (a higher score, or an equal one earlier in the list)
        before = (comb[None, :] > comb[:, None]) | ((comb[None, :] == comb[:, None]) & (j[None, :] < j[:, None]))
        rank = tl.sum(before.to(tl.int32), axis=1)
        # running order: candidates by position, eos ones after every other (padding after all)
        key = tl.where(is_new, tl.where(eos_c, kidx + K, kidx), 4 * K + j)
        rk = tl.sum((key[None, :] < key[:, None]).to(tl.int32), axis=1)

        r = tl.arange(0, NBP)
        rmask = r < NB
        m_fin = rank[None, :] == r[:, None]  # [NBP, NP]: the entry kept at position r
        fs_r = tl.sum(tl.where(m_fin, comb[None, :], 0.0), axis=1)
        fl_r = tl.sum(tl.where(m_fin, len_src[None, :], 0), axis=1)
        fj_r = tl.sum(tl.where(m_fin, j[None, :], 0), axis=1)
        fbeam_r = tl.sum(tl.where(m_fin, beam_c[None, :], 0), axis=1)
        ftok_r = tl.sum(tl.where(m_fin, tok_c[None, :], 0), axis=1)
        fold_r = fj_r < NB
        m_run = rk[None, :] == r[:, None]  # [NBP, NP]: the candidate running at position r
        s_r = tl.sum(tl.where(m_run, ts[None, :], 0.0), axis=1)
        tok_r = tl.sum(tl.where(m_run, tok_c[None, :], 0), axis=1)
        beam_r = tl.sum(tl.where(m_run, beam_c[None, :], 0), axis=1)
        live_r = (tl.sum(tl.where(m_run & ~eos_c[None, :], 1, 0), axis=1) > 0) & active
        run_s = tl.where(live_r, s_r, -1e9)
        run_tok = tl.where(live_r, tok_r, PAD)
        run_src = tl.where(live_r, beam_r, 0)
        best = tl.max(tl.where(rmask, run_s, -float("inf")), axis=0)
        worst = tl.sum(tl.where(r == NB - 1, fs_r, 0.0), axis=0)
        now_done = (active == 0) | ((worst > -float("inf")) & (worst >= best.to(tl.float64) / denom))

        # sequences, a column block at a time: every row this prompt writes is read first (a barrier between)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            m2 = rmask[:, None] & (cols < N)[None, :]
            at_col = cols[None, :] == col
            f_old = tl.load(fin_seqs_ptr + (b * NB + fj_r)[:, None] * N + cols[None, :], mask=m2 & fold_r[:, None],
                            other=0)
            f_new = tl.load(seqs_ptr + (b * NB + fbeam_r)[:, None] * N + cols[None, :], mask=m2 & ~fold_r[:, None],
                            other=0)
            f_rows = tl.where(fold_r[:, None], f_old, tl.where(at_col, ftok_r[:, None], f_new))
            run_rows = tl.load(seqs_ptr + (b * NB + run_src)[:, None] * N + cols[None, :], mask=m2, other=0)
            run_rows = tl.where(at_col, run_tok[:, None], run_rows)
            tl.debug_barrier()
            tl.store(fin_seqs_ptr + (b * NB + r)[:, None] * N + cols[None, :], f_rows, mask=m2)
            tl.store(seqs_ptr + (b * NB + r)[:, None] * N + cols[None, :], run_rows, mask=m2)
            tl.debug_barrier()
        tl.store(fin_s_ptr + b * NB + r, fs_r, mask=rmask)
        tl.store(fin_len_ptr + b * NB + r, fl_r, mask=rmask)
        tl.store(scores_ptr + b * NB + r, run_s, mask=rmask)
        tl.store(tok_ptr + b * NB + r, run_tok, mask=rmask)
        tl.store(src_ptr + b * NB + r, b * NB + run_src, mask=rmask)
        tl.store(done_ptr + b, now_done.to(tl.int1))


def beam_update_reference(sel, top_s: torch.Tensor, top_i: torch.Tensor, V: int, denom: torch.Tensor) -> None:
    """The step's update in PyTorch ops, in place on the BeamSelect `sel`'s buffers (see kernels/beam_select.py)."""
    B, nb, n, K = sel.B, sel.nb, sel.n, 2 * sel.nb
    beam_i, tok_i = top_i // V, top_i % V
    i = torch.remainder(sel.t, n)
    active = ~sel.done
    is_eos = tok_i == sel.eos
    # finished hypotheses: eos among the best nb candidates of a prompt still running; the kept ones are the best
    # nb of (kept so far, then these in rank order), a stable sort (an equal score does not displace)
    new_sc = torch.where(is_eos & (sel.rank < nb) & active[:, None], top_s.double() / denom, -float("inf"))
    new_seq = sel.seqs[(sel.row0 + beam_i).view(-1)].view(B, K, n)
    new_seq.index_copy_(2, i.view(1), tok_i[:, :, None])
    all_sc = torch.cat([sel.fin_scores, new_sc], dim=1)
    keep = torch.sort(all_sc, dim=1, descending=True, stable=True).indices[:, :nb]
    fin_seqs = torch.cat([sel.fin_seqs, new_seq], dim=1).gather(1, keep[:, :, None].expand(B, nb, n))
    fin_len = torch.cat([sel.fin_len, (sel.t + 1).expand(B, K)], dim=1).gather(1, keep)
    sel.fin_scores.copy_(all_sc.gather(1, keep))
    sel.fin_seqs.copy_(fin_seqs)
    sel.fin_len.copy_(fin_len)
    # the running beams: the first nb candidates (by rank) that are not eos; a prompt short of them, or done before
    # this step, gets placeholder beams (score -1e9, pad, from its first beam)
    pick = torch.where(is_eos, sel.rank + K, sel.rank).argsort(dim=1)[:, :nb]
    live = ~is_eos.gather(1, pick) & active[:, None]
    run_s = torch.where(live, top_s.gather(1, pick), -1e9)
    run_tok = torch.where(live, tok_i.gather(1, pick), sel.pad_token)
    run_src = torch.where(live, beam_i.gather(1, pick), 0)
    worst = sel.fin_scores[:, nb - 1]
    best_running = run_s.max(dim=1).values.double() / denom
    sel.done.logical_or_(active & (worst > -float("inf")) & (worst >= best_running))
    sel.ended.index_copy_(0, i.view(1), sel.done.all().view(1))
    sel.src.copy_((sel.row0 + run_src).view(-1))
    sel.seqs.copy_(sel.seqs.index_select(0, sel.src))
    sel.seqs.index_copy_(1, i.view(1), run_tok.view(-1, 1))
    sel.scores.copy_(run_s)
    sel.tok.copy_(run_tok.view(-1))
    sel.t.add_(1)


def beam_update(sel, top_s: torch.Tensor, top_i: torch.Tensor, V: int, denom: torch.Tensor,
                use_kernel: bool = False) -> None:
    """The step's update of BeamSelect `sel` from its prompts' top-2k candidates (top_s [B, 2k] float32 sums of log
    probabilities, top_i [B, 2k] int64 flat indices into beam x vocabulary V) and denom (float64 [], the length
    after this step ** length_penalty): the kernel with use_kernel (where Triton runs), the reference otherwise."""
    if not (use_kernel and HAVE_TRITON):
        return beam_update_reference(sel, top_s, top_i, V, denom)
    B, nb, n = sel.B, sel.nb, sel.n
    K = 2 * nb
    top_s, top_i = top_s.contiguous(), top_i.contiguous()  # (BeamSelect's own buffers are contiguous)
    _beam_update_kernel[(B,)](top_s, top_i, denom, sel.scores, sel.seqs, sel.fin_scores, sel.fin_seqs, sel.fin_len,
                              sel.done, sel.tok, sel.src, sel.t, V, n, int(sel.pad_token), int(sel.eos),
                              NB=nb, K=K, NBP=triton.next_power_of_2(nb), NP=triton.next_power_of_2(nb + K),
                              BLOCK_N=min(triton.next_power_of_2(n), 256), num_warps=4)
    _ended_kernel[(1,)](sel.done, sel.ended, sel.t, B, n, BLOCK_B=triton.next_power_of_2(B), num_warps=1)
