"""Greedy decoding's per-step choice as one kernel (two for a batch of several rows): next token = argmax of
the logits (pad for rows that already ended), written to the next step's input and to the output at column
t % n; done |= (token == eos); ended[t % n] = every row done; t += 1.

Why: in PyTorch this is ~9 kernels (argmax, where, remainder, two index_copy, ==, logical_or, all, copy, add);
inside a captured decode step each costs a launch of ~1.5-10 us (argmax over a 32k vocabulary alone ~10 us
on the H200, bench/results/profile-decode-*.json), at the end of the step, where nothing overlaps it.

Ties go to the lowest index and NaN counts as the largest value (the first NaN wins), as torch.argmax does.
Legend: B rows, V vocabulary, n output columns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

MAX_BLOCK_V = 32768  # one load round for vocabularies up to this size (T5's 32128)


if HAVE_TRITON:

    from kernels.mailbox import _fence_system  # the system-scope fence ahead of a store the host polls

    @triton.jit
    def _select_row_kernel(logits_ptr, idx_ptr, tok_ptr, out_ptr, done_ptr, ended_ptr, t_ptr,
                           V, N, B, stride_l, stride_o, PAD, EOS, guess_ptr, early_ptr, seq_ptr,
                           LAST: tl.constexpr, BLOCK_V: tl.constexpr, HAS_IDX: tl.constexpr,
                           EARLY: tl.constexpr, FENCE: tl.constexpr):
        # Row b's argmax over V (first index of the max; the first NaN if any), then its token, output column
        # and done flag. LAST (a batch of one row): also ended[t % n] and t += 1, else _ended_kernel does them.
        # HAS_IDX: the V values are partials (kernels/lm_head.py: a tile's maximum), idx [B, V] their indices
        b = tl.program_id(0)
        t = tl.load(t_ptr)
        col = t % N
        offs = tl.arange(0, BLOCK_V)
        big = V + BLOCK_V
        best = -float("inf")
        best_i = big
        nan_i = big
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs
            mask = idx < V
            x = tl.load(logits_ptr + b * stride_l + idx, mask=mask, other=-float("inf")).to(tl.float32)
            is_nan = (x != x) & mask
            nan_i = tl.minimum(nan_i, tl.min(tl.where(is_nan, idx, big), axis=0))
            x = tl.where(is_nan, -float("inf"), x)
            m = tl.max(x, axis=0)
            i = tl.min(tl.where((x == m) & mask, idx, big), axis=0)
            take = m > best  # strictly: an equal value later in the row does not replace the first
            best_i = tl.where(take, i, best_i)
            best = tl.where(take, m, best)
        best_i = tl.where(best_i == big, 0, best_i)  # every value -inf (and no NaN): index 0, as torch.argmax
        arg = tl.where(nan_i < big, nan_i, best_i)
        if HAS_IDX:
            arg = tl.load(idx_ptr + b * stride_l + arg).to(tl.int64)
        was_done = tl.load(done_ptr + b) != 0
        nxt = tl.where(was_done, PAD, arg).to(tl.int64)
        tl.store(out_ptr + b * stride_o + col, nxt)
        tl.store(tok_ptr + b, nxt)
        now_done = was_done | (nxt == EOS)
        tl.store(done_ptr + b, now_done.to(tl.int1))
        if LAST:
            tl.store(ended_ptr + col, now_done.to(tl.int1))
            tl.store(t_ptr, t + 1)
        if EARLY:  # the next step's first-block guess for the host: the expert, then (behind a fence) its sequence
            one = tl.arange(0, 1)
            e = tl.load(guess_ptr + nxt + one * 0).to(tl.int64)
            seq = tl.load(seq_ptr) + 1
            tl.store(seq_ptr, seq)
            tl.store(early_ptr + 1 + one, e)
            seq_1 = seq + tl.zeros([1], dtype=tl.int64)
            if FENCE:
                tl.debug_barrier()
                seq_1 = seq_1 + _fence_system(tl.zeros([1], dtype=tl.int32)).to(tl.int64)
            tl.store(early_ptr + one, seq_1)

    @triton.jit
    def _ended_kernel(done_ptr, ended_ptr, t_ptr, B, N, BLOCK_B: tl.constexpr):
        t = tl.load(t_ptr)
        offs = tl.arange(0, BLOCK_B)
        d = tl.load(done_ptr + offs, mask=offs < B, other=1).to(tl.int32)
        tl.store(ended_ptr + t % N, (tl.min(d, axis=0) != 0).to(tl.int1))
        tl.store(t_ptr, t + 1)


def greedy_select_reference(logits: torch.Tensor | None, tok: torch.Tensor, out: torch.Tensor, done: torch.Tensor,
                            ended: torch.Tensor, t: torch.Tensor, pad: int, eos: int,
                            chosen: torch.Tensor | None = None, early: EarlyGuess | None = None) -> None:
    """The same in PyTorch ops (in place on tok [B], out [B, n], done [B], ended [n], t []); chosen: the tokens
    (pad already in for ended rows) instead of the logits' argmax."""
    nxt = torch.where(done, pad, logits.argmax(-1)) if chosen is None else chosen
    i = torch.remainder(t, out.shape[1]).view(1)
    out.index_copy_(1, i, nxt[:, None])
    done.logical_or_(nxt == eos)
    ended.index_copy_(0, i, done.all().view(1))
    tok.copy_(nxt)
    t.add_(1)
    if early is not None:  # the expert first, then the sequence (host memory: in order)
        early.seq.add_(1)
        early.out[1].copy_(early.table.view(-1)[nxt[0]].long())
        early.out[0].copy_(early.seq[0])


@dataclass
class EarlyGuess:
    """What a one-row greedy choice hands the host for the next step's first-block guess (infer.offload.DmaCopier's
    early copy): after choosing token x it writes out[1] = table[x] (the expert the guess will name, -1: none), then
    (behind a system fence) out[0] = seq + 1, seq being a device counter it advances. table int32 [V, 1] (the guess
    table, on the device), out int64 [2] (pinned host memory), seq int64 [1] (device)."""

    table: torch.Tensor
    out: torch.Tensor
    seq: torch.Tensor


def greedy_select(logits: torch.Tensor, tok: torch.Tensor, out: torch.Tensor, done: torch.Tensor,
                  ended: torch.Tensor, t: torch.Tensor, pad: int, eos: int, force_triton: bool = False,
                  index: torch.Tensor | None = None, early: EarlyGuess | None = None) -> None:
    """In place: the step's greedy choice from logits [B, V] (any float dtype). The kernel on CUDA (or with
    force_triton, for tests under TRITON_INTERPRET=1), the reference otherwise. index: int32 [B, V] of the same
    layout: `logits` are partials (kernels/lm_head.py: each tile's maximum, in tile order) and the token is the
    index beside the chosen one. early (one row only): also hand the next step's guess to the host (EarlyGuess)."""
    if early is not None and tok.shape[0] != 1:
        raise ValueError(f"greedy_select: early needs one row, got {tok.shape[0]}")
    if not HAVE_TRITON or not (logits.is_cuda or force_triton):
        if index is not None:
            nxt = torch.where(done, pad, index.gather(1, logits.argmax(-1, keepdim=True))[:, 0].long())
            return greedy_select_reference(None, tok, out, done, ended, t, pad, eos, chosen=nxt, early=early)
        return greedy_select_reference(logits, tok, out, done, ended, t, pad, eos, early=early)
    B, V = logits.shape
    if index is not None and (index.shape != logits.shape or index.stride() != logits.stride()
                              or index.dtype != torch.int32):
        raise ValueError(f"greedy_select: index must be int32 of the partials' shape and layout, got {index.dtype} "
                         f"{tuple(index.shape)} for {tuple(logits.shape)}")
    n = out.shape[1]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    for name, x, dtype in (("tok", tok, torch.long), ("out", out, torch.long), ("done", done, torch.bool),
                           ("ended", ended, torch.bool), ("t", t, torch.long)):
        if x.dtype != dtype:
            raise ValueError(f"greedy_select: {name} must be {dtype}, got {x.dtype}")
    if tok.shape != (B,) or done.shape != (B,) or out.shape[0] != B or out.stride(1) != 1 or ended.shape != (n,):
        raise ValueError(f"greedy_select: logits {tuple(logits.shape)} with tok {tuple(tok.shape)}, out "
                         f"{tuple(out.shape)}, done {tuple(done.shape)}, ended {tuple(ended.shape)}")
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    warps = 16 if block_v >= 16384 else 8 if block_v >= 4096 else 4
    ep = early if early is not None else EarlyGuess(t, t, t)  # placeholders for unused pointers
    _select_row_kernel[(B,)](logits, logits if index is None else index, tok, out, done, ended, t, V, n, B,
                             logits.stride(0), out.stride(0), int(pad), int(eos), ep.table, ep.out, ep.seq,
                             LAST=B == 1, BLOCK_V=block_v, HAS_IDX=index is not None, EARLY=early is not None,
                             FENCE=logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1", num_warps=warps)
    if B > 1:
        _ended_kernel[(1,)](done, ended, t, B, n, BLOCK_B=triton.next_power_of_2(B), num_warps=1)
