"""Greedy and beam-search generation on top of `Switch.prefill` / `Switch.decode_one_token`.

`step` can be swapped for any function with decode_one_token's signature (the inference engine
passes a graph-replayed or offloading step); the search logic stays the same, so every policy
generates through one code path.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from kernels import lm_head
from kernels.beam_select import beam_update
from kernels.beam_topk import beam_topk, beam_topk_reference
from kernels.greedy import HAVE_TRITON as GREEDY_KERNEL
from kernels.greedy import greedy_select
from models.switch import DecodeState, Switch

Step = Callable[[DecodeState, torch.Tensor], torch.Tensor]


def _ended_flags(n: int, device, kernel: bool) -> torch.Tensor:
    """A select's "every row done after step t" flags [n] (bool, ended[t % n]). Where its kernel writes them on
    CUDA: in pinned host memory, so the decode loop reads them after step t's event with no copy queued between
    two steps (a 1-byte device-to-host copy there held the GPU idle ~5 us per step on the H200). Else, or with
    PGMOE_ENDED_COPY=1 (bench variant #flagcopy): on the device, copied to the host after each step."""
    if kernel and torch.device(device).type == "cuda" and os.environ.get("PGMOE_ENDED_COPY", "0") != "1":
        return torch.empty(n, dtype=torch.bool, pin_memory=True)
    return torch.empty(n, dtype=torch.bool, device=device)


class GreedySelect:
    """Greedy decoding's per-step choice on the device, in static buffers, so that it can run inside the step's
    CUDA graph (infer.engine.GraphStep captures it after the decoder step; replaying the graph then runs both):
    next token = argmax of the logits (pad_token_id for rows that ended), written to `tok` (the next step's
    input) and to out[:, t]; done |= (token == eos); ended[t] = every row done; t advances. Indices wrap at
    max_new_tokens, so extra calls (replays after a run) write in bounds."""

    def __init__(self, batch: int, max_new_tokens: int, device, start_token: int, pad_token: int, eos_token: int):
        self.n, self.start, self.eos, self.pad_token = max(1, max_new_tokens), start_token, eos_token, pad_token
        self.tok = torch.empty(batch, dtype=torch.long, device=device)
        self.out = torch.empty((batch, self.n), dtype=torch.long, device=device)
        self.done = torch.empty(batch, dtype=torch.bool, device=device)
        # "every row done after step t" (ended[t % n]); greedy_select runs its kernel wherever Triton is
        self.ended = _ended_flags(self.n, device, kernel=GREEDY_KERNEL)
        self.t = torch.empty((), dtype=torch.long, device=device)
        self.captured = False  # set by the graph that runs it
        self._head_bufs = None  # from_hidden's logits and partials (static: a captured graph reads them)
        # one row: the choice also hands the next step's first-block guess to the host (kernels.greedy.EarlyGuess; set
        # by infer.engine where the dma copier takes it: infer.offload.DmaCopier.enable_early)
        self.early = None
        self.reset()

    def reset(self) -> None:
        """Back to before the first step (the start token, nothing done)."""
        self.tok.fill_(self.start)
        self.out.fill_(self.pad_token)
        self.done.zero_()
        self.ended.zero_()
        self.t.zero_()

    def __call__(self, logits: torch.Tensor) -> None:
        # one kernel on CUDA (kernels/greedy.py), the same PyTorch ops elsewhere
        greedy_select(logits, self.tok, self.out, self.done, self.ended, self.t, self.pad_token, self.eos,
                      early=self.early)

    def fuses_head(self, model: Switch, force_triton: bool = False) -> bool:
        """Whether from_hidden takes the LM head of `model` into its kernels (kernels/lm_head.py: on CUDA, up
        to lm_head.MAX_ROWS rows)."""
        return lm_head.supported(self.tok.shape[0], model.head()[0], force_triton)

    def from_hidden(self, model: Switch, h, force_triton: bool = False) -> torch.Tensor:
        """The choice from the decoder's final hidden state h [B, D] (Switch.decode_hidden), or from its last
        block's (residual, output) (decode_hidden(split_last=True)): the final add and norm (with the split form),
        the LM head and each vocabulary tile's argmax in one kernel, then the choice over the tiles' partials (two
        kernels for the ~6 of the logits' path: kernels/lm_head.py). Returns the fp32 logits [B, V] as
        decode_one_token does (the same values, summed in another order). Where fuses_head is false:
        decode_one_token's norm and head, then __call__."""
        w, scale = model.head()
        norm = model.decoder.final_norm
        if not self.fuses_head(model, force_triton):
            if isinstance(h, tuple):
                h = norm(h[0] + h[1])
            logits = model._logits(h[:, None])[:, 0].float()
            self(logits)
            return logits
        h, add = h if isinstance(h, tuple) else (h, None)
        B, V = h.shape[0], w.shape[0]
        key = (V, w.device)
        if self._head_bufs is None or self._head_bufs[0] != key:
            P = lm_head.tiles(V, lm_head.CONFIG["block_v"])
            self._head_bufs = (key, torch.empty(B, V, dtype=torch.float32, device=w.device),
                               torch.empty(B, P, dtype=torch.float32, device=w.device),
                               torch.empty(B, P, dtype=torch.int32, device=w.device))
        _, logits, pval, pidx = self._head_bufs
        lm_head.lm_head_partials(h, w, scale, logits, pval, pidx, add=add,
                                 norm_weight=None if add is None else norm.weight, eps=norm.eps)
        greedy_select(pval, self.tok, self.out, self.done, self.ended, self.t, self.pad_token, self.eos,
                      force_triton=force_triton, index=pidx, early=self.early)
        return logits


@torch.no_grad()
def greedy(
    model: Switch,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    step: Step | None = None,
    state: DecodeState | None = None,
    on_token: Callable[[int], None] | None = None,
    select: GreedySelect | None = None,
) -> torch.Tensor:
    """Greedy decoding -> generated ids [B, n] (n <= max_new_tokens, without the start token);
    sequences that ended are padded with pad_token_id, as transformers does. The host loop (_decode_loop)
    never waits for the step it just launched; on_token(t) is called once step t's token is complete.

    The choice of each token is a GreedySelect; `select`: one whose calls `step` makes itself (captured in
    the step's CUDA graph: select.captured), fed by select.tok, so a step is one graph replay and one flag copy.
    A wrapper of such a step that changes its logits must not pass that select on (it would not see them)."""
    cfg = model.cfg
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    step = step or model.decode_one_token
    state = state or model.prefill(input_ids, attention_mask, max_len=max_new_tokens)
    B, dev = input_ids.shape[0], input_ids.device
    cuda = dev.type == "cuda"
    if select is not None and (select.tok.shape[0] != B or select.n < max_new_tokens or select.eos != eos):
        raise ValueError(f"greedy: a GreedySelect for batch {select.tok.shape[0]}, {select.n} tokens, eos "
                         f"{select.eos}; this call has batch {B}, {max_new_tokens} tokens, eos {eos}")
    sel = select or GreedySelect(B, max_new_tokens, dev, cfg.decoder_start_token_id, cfg.pad_token_id, eos)
    n = _decode_loop(step, state, sel, max_new_tokens, on_token, cuda)
    return sel.out[:, :n].clone()


class BeamSelect:
    """Beam search's per-step choice on the device, in static buffers, so that it can run inside the step's CUDA
    graph (infer.engine.GraphStep captures it after the decoder step, as it does GreedySelect): transformers'
    scoring (sum of log-probabilities / length ** length_penalty, 2 * num_beams candidates per step, at most
    num_beams finished hypotheses kept per prompt, a prompt done once its worst kept hypothesis scores at least its
    best running beam would), the running beams' tokens written to `tok` (the next step's input), and the rows the
    caches take written to `src`, which `state` applies at the next step's start (DecodeState.defer_reorder).
    Every decision is a fixed-shape tensor operation: ranks order the candidates and a stable sort keeps the
    finished hypotheses, so the choices (ties included) are the ones the host-side loop made before it.
    ended[t] = every prompt done after step t; indices wrap at max_new_tokens.
    `result()` reads the buffers once the loop ends and returns the best hypothesis per prompt."""

    def __init__(self, batch: int, num_beams: int, max_new_tokens: int, device, start_token: int, pad_token: int,
                 eos_token: int, length_penalty: float = 1.0, state: DecodeState | None = None,
                 kernel: bool | None = None, topk: bool | None = None):
        B, nb, n = batch, num_beams, max(1, max_new_tokens)
        self.B, self.nb, self.n = B, nb, n
        self.start, self.pad_token, self.eos, self.length_penalty = start_token, pad_token, eos_token, length_penalty
        self.state = state
        self.tok = torch.empty(B * nb, dtype=torch.long, device=device)
        self.scores = torch.empty((B, nb), dtype=torch.float32, device=device)  # running beams' sums of log p
        self.seqs = torch.empty((B * nb, n), dtype=torch.long, device=device)  # running beams' tokens
        self.fin_scores = torch.empty((B, nb), dtype=torch.float64, device=device)  # kept, best first; -inf: none
        self.fin_seqs = torch.empty((B, nb, n), dtype=torch.long, device=device)
        self.fin_len = torch.empty((B, nb), dtype=torch.long, device=device)
        self.done = torch.empty(B, dtype=torch.bool, device=device)
        self.t = torch.empty((), dtype=torch.long, device=device)
        self.src = torch.empty(B * nb, dtype=torch.long, device=device)  # the rows the caches take, per step
        self.rank = torch.arange(2 * nb, device=device)
        # the update after the top-2k as one kernel (kernels/beam_select.py) instead of ~50 tensor ops, the same
        # choices either way: the default on CUDA (H200: 84 instead of 152 us per step in a CUDA graph,
        # bench/results/probe-beam-select-h200.md); PGMOE_BEAM_KERNEL=0 turns it off, =1 asks for it on the CPU
        # too (under Triton's interpreter only: the tests)
        if kernel is None:
            env = os.environ.get("PGMOE_BEAM_KERNEL")
            cuda = torch.device(device).type == "cuda"
            kernel = cuda if env is None else env == "1" and (cuda or os.environ.get("TRITON_INTERPRET") == "1")
        self.kernel = bool(kernel)
        # the candidates (log-softmax, the add, the top-2k) by kernels/beam_topk.py's three kernels instead of ~30
        # launches of tensor ops, wherever the update's kernel runs; PGMOE_BEAM_TOPK=0: the tensor ops; topk= overrides
        if topk is None:
            topk = os.environ.get("PGMOE_BEAM_TOPK", "1") != "0"
        self.topk_kernel = self.kernel and bool(topk)
        self.ended = _ended_flags(n, device, kernel=self.kernel)  # "every prompt done after step t"
        self.row0 = torch.arange(B, device=device)[:, None] * nb  # each prompt's first beam row
        # the caches take self.src at the start of the next step (DecodeState.defer_reorder: there the gather runs
        # while that step's first expert copies do); PGMOE_BEAM_DEFER=0: at the end of this one, as before (the
        # lever's A/B switch)
        self.defer = os.environ.get("PGMOE_BEAM_DEFER", "1") != "0"
        if state is not None and self.defer:
            state.defer_reorder(self.src)
        self.captured = False  # set by the graph that runs it
        self.reset()

    def reset(self) -> None:
        """Back to before the first step: only each prompt's first beam live (so the first step does not pick
        num_beams copies of one token), nothing finished, and the state's rows of each prompt made copies of its
        first beam's (what the first step's reorder did before; the steps then reorder the self-attention caches
        only, the encoder side of a prompt's beams being equal)."""
        if self.state is not None:
            self.state.reorder(self.row0.expand(self.B, self.nb).reshape(-1))
            if self.defer:
                self.state.clear_deferred()  # no reorder pending before the first step
        self.tok.fill_(self.start)
        self.scores.fill_(-1e9)
        self.scores[:, 0] = 0.0
        self.seqs.fill_(self.pad_token)
        self.fin_scores.fill_(-float("inf"))
        self.fin_seqs.fill_(self.pad_token)
        self.fin_len.zero_()
        self.done.zero_()
        self.ended.zero_()
        self.t.zero_()

    def __call__(self, logits: torch.Tensor) -> None:
        nb, K = self.nb, 2 * self.nb
        V = logits.shape[-1]
        if self.topk_kernel:
            top_s, top_i = beam_topk(logits, self.scores, nb, K)  # [B, K], best first
        else:
            top_s, top_i = beam_topk_reference(logits, self.scores, nb, K)
        denom = (self.t + 1).double() ** self.length_penalty  # the hypotheses' length after this step
        beam_update(self, top_s, top_i, V, denom, use_kernel=self.kernel)
        if self.state is not None and not self.defer:
            self.state.reorder(self.src, cross=False)

    def result(self, steps: int) -> torch.Tensor:
        """The best hypothesis per prompt after `steps` steps -> ids [B, n] padded with pad_token_id: prompts not
        done also weigh their running beams (length `steps`), as transformers does."""
        nb, lp = self.nb, self.length_penalty
        fin_s, fin_len = self.fin_scores.tolist(), self.fin_len.tolist()
        fin_seqs, seqs = self.fin_seqs.cpu(), self.seqs.cpu()
        scores, done = self.scores.tolist(), self.done.tolist()
        best = []
        for b in range(self.B):
            kept = [(s, fin_seqs[b, j, :ln]) for j, (s, ln) in enumerate(zip(fin_s[b], fin_len[b]))
                    if s > -float("inf")]
            if not done[b]:
                for j in range(nb):
                    s = scores[b][j]
                    if s <= -1e8:
                        continue
                    score = s / (steps**lp)
                    if len(kept) < nb or score > min(k[0] for k in kept):
                        kept.append((score, seqs[b * nb + j, :steps]))
                        kept.sort(key=lambda x: -x[0])
                        del kept[nb:]
            best.append(kept[0][1])
        n = max(len(h) for h in best)
        out = torch.full((self.B, n), self.pad_token, dtype=torch.long)
        for b, h in enumerate(best):
            out[b, : len(h)] = h
        return out.to(self.tok.device)


def _decode_loop(step: Step, state: DecodeState, sel, max_new_tokens: int, on_token, cuda: bool) -> int:
    """Run the decode steps of a GreedySelect or BeamSelect `sel` -> the steps whose output counts.

    The host never waits for the step it just launched: step t + 1 is queued before the host reads whether
    every sequence had ended at step t (a flag copied to pinned memory behind step t, waited on through an
    event, which lets go of the GIL: a host thread the step waits on, infer.offload.DmaCopier, can run), so the
    GPU does not idle while the host runs the loop. Where every sequence ended at step t, the already-queued
    step t + 1 is dropped from the output (it ran, so the state has advanced one step past the output).
    on_token(t) is called once step t is complete (its event waited on), not after a device-wide sync."""
    # "every sequence ended after step t", two host slots (steps t and t - 1 are in flight at once); none where the
    # select's kernel writes its flags to pinned host memory itself
    host_flags = cuda and not sel.ended.is_cuda
    ended = torch.zeros(2, dtype=torch.bool, pin_memory=cuda)
    n = 0
    pending: tuple[int, torch.cuda.Event | None] | None = None  # the step launched before this one

    def finish(t: int, ev: torch.cuda.Event | None) -> bool:
        if ev is not None:
            ev.synchronize()  # step t and its flag, not the step queued after it
        if on_token is not None:
            on_token(t)
        return bool(sel.ended[t % sel.n]) if host_flags else bool(ended[t % 2])

    for t in range(max_new_tokens):
        logits = step(state, sel.tok)
        if not sel.captured:
            sel(logits)
        n = t + 1
        if not host_flags:
            ended[t % 2].copy_(sel.ended[t], non_blocking=cuda)
        ev = None
        if cuda:
            ev = torch.cuda.Event()
            ev.record()
        if pending is not None and finish(*pending):
            n = t  # every sequence had ended: step t is past the end
            pending = None
            break
        pending = (t, ev)
    if pending is not None:
        finish(*pending)
    return n


@torch.no_grad()
def beam_search(
    model: Switch,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    num_beams: int = 4,
    eos_token_id: int | None = None,
    length_penalty: float = 1.0,
    step: Step | None = None,
    state: DecodeState | None = None,
    on_token: Callable[[int], None] | None = None,
    select: BeamSelect | None = None,
) -> torch.Tensor:
    """Beam search with transformers' scoring (sum of log-probabilities / length ** length_penalty,
    2 * num_beams candidates per step, finished hypotheses kept per prompt) -> best ids [B, n].

    Each step's choice is a BeamSelect on the device (the host loop as greedy's: it never waits for the step it
    just launched). `select`: one whose calls `step` makes itself (captured in the step's CUDA graph:
    select.captured), fed by select.tok, choosing the rows `state` takes at the next step's start."""
    cfg = model.cfg
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    step = step or model.decode_one_token
    B, dev = input_ids.shape[0], input_ids.device
    nb = num_beams
    if state is None:
        ids = input_ids.repeat_interleave(nb, dim=0)
        mask = None if attention_mask is None else attention_mask.repeat_interleave(nb, dim=0)
        state = model.prefill(ids, mask, max_len=max_new_tokens)
    if select is not None and (select.B != B or select.nb != nb or select.n < max_new_tokens or select.eos != eos
                               or select.length_penalty != length_penalty or select.state is not state):
        raise ValueError(f"beam_search: a BeamSelect for batch {select.B} x {select.nb} beams, {select.n} tokens, eos "
                         f"{select.eos}, length penalty {select.length_penalty} (and its own state); this call has "
                         f"batch {B} x {nb} beams, {max_new_tokens} tokens, eos {eos}, length penalty {length_penalty}")
    sel = select or BeamSelect(B, nb, max_new_tokens, dev, cfg.decoder_start_token_id, cfg.pad_token_id, eos,
                               length_penalty, state)
    steps = _decode_loop(step, state, sel, max_new_tokens, on_token, dev.type == "cuda")
    return sel.result(steps)


def generate(model: Switch, input_ids, attention_mask=None, max_new_tokens=32, num_beams=1, **kw) -> torch.Tensor:
    if num_beams <= 1:
        return greedy(model, input_ids, attention_mask, max_new_tokens, **kw)
    return beam_search(model, input_ids, attention_mask, max_new_tokens, num_beams=num_beams, **kw)
