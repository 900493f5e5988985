"""Greedy and beam-search generation on top of `Switch.prefill` / `Switch.decode_one_token`.

`step` can be swapped for any function with decode_one_token's signature (the inference engine
passes a graph-replayed or offloading step); the search logic stays the same, so every policy
generates through one code path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.greedy import greedy_select
from models.switch import DecodeState, Switch

Step = Callable[[DecodeState, torch.Tensor], torch.Tensor]


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
        self.ended = torch.empty(self.n, dtype=torch.bool, device=device)
        self.t = torch.empty((), dtype=torch.long, device=device)
        self.captured = False  # set by the graph that runs it
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
        greedy_select(logits, self.tok, self.out, self.done, self.ended, self.t, self.pad_token, self.eos)


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
    sequences that ended are padded with pad_token_id, as transformers does.

    The host never waits for the step it just launched: step t + 1 is queued before the host reads
    whether every sequence had ended at step t (a flag copied to pinned memory behind step t, waited
    on through an event), so the GPU does not idle while the host runs the loop. Where every sequence
    ended at step t, the already-queued step t + 1 is dropped from the output (it ran, so the state
    has advanced one step past the output). on_token(t) is called once step t's token is complete
    (its event waited on; the host is then at most one step ahead), not after a device-wide sync.

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
    # "every sequence ended after step t", two host slots (steps t and t - 1 are in flight at once)
    ended = torch.zeros(2, dtype=torch.bool, pin_memory=cuda)
    n = 0
    pending: tuple[int, torch.cuda.Event | None] | None = None  # the step launched before this one

    def finish(t: int, ev: torch.cuda.Event | None) -> bool:
        if ev is not None:
            ev.synchronize()  # step t and its flag, not the step queued after it
        if on_token is not None:
            on_token(t)
        return bool(ended[t % 2])

    for t in range(max_new_tokens):
        logits = step(state, sel.tok)
        if not sel.captured:
            sel(logits)
        n = t + 1
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
    return sel.out[:, :n].clone()


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
) -> torch.Tensor:
    """Beam search with transformers' scoring (sum of log-probabilities / length ** length_penalty,
    2 * num_beams candidates per step, finished hypotheses kept per prompt) -> best ids [B, n]."""
    cfg = model.cfg
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    step = step or model.decode_one_token
    B, dev = input_ids.shape[0], input_ids.device
    nb = num_beams
    if state is None:
        ids = input_ids.repeat_interleave(nb, dim=0)
        mask = None if attention_mask is None else attention_mask.repeat_interleave(nb, dim=0)
        state = model.prefill(ids, mask, max_len=max_new_tokens)
    tok = torch.full((B * nb,), cfg.decoder_start_token_id, dtype=torch.long, device=dev)
    # Only the first beam is live at the start, so the first step does not pick nb copies of one token.
    scores = torch.full((B, nb), -1e9, device=dev)
    scores[:, 0] = 0.0
    seqs = torch.zeros(B * nb, 0, dtype=torch.long, device=dev)
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
    done = [False] * B

    def worst(b):
        return min(s for s, _ in finished[b]) if len(finished[b]) >= nb else -float("inf")

    for t in range(max_new_tokens):
        logp = torch.log_softmax(step(state, tok), dim=-1)  # [B*nb, V]
        V = logp.shape[-1]
        cand = (logp + scores.view(-1, 1)).view(B, nb * V)
        top_s, top_i = cand.topk(2 * nb, dim=1)
        beam_i, tok_i = top_i // V, top_i % V
        # the next beams, chosen on the host and uploaded at once: [score, token, source beam] per row and slot
        nxt = [[[-1e9, float(cfg.pad_token_id), 0.0] for _ in range(nb)] for _ in range(B)]
        if dev.type == "cuda":
            # wait for the step through an event, which lets go of the GIL (tolist() would hold it while it
            # waits): a host thread the step waits on (infer.offload.DmaCopier, copy_mode dma) can then run
            ev = torch.cuda.Event()
            ev.record()
            ev.synchronize()
        top_s_l, beam_l, tok_l = top_s.tolist(), beam_i.tolist(), tok_i.tolist()
        cur_len = t + 1
        for b in range(B):
            if done[b]:
                continue
            n = 0
            for rank in range(2 * nb):
                s, bi, ti = top_s_l[b][rank], beam_l[b][rank], tok_l[b][rank]
                if ti == eos:
                    if rank >= nb:
                        continue
                    hyp = torch.cat([seqs[b * nb + bi], seqs.new_tensor([ti])])
                    score = s / (cur_len**length_penalty)
                    if len(finished[b]) < nb or score > worst(b):
                        finished[b].append((score, hyp))
                        finished[b].sort(key=lambda x: -x[0])
                        del finished[b][nb:]
                else:
                    nxt[b][n] = [s, float(ti), float(bi)]
                    n += 1
                if n == nb:
                    break
            best_running = max(v[0] for v in nxt[b])
            if len(finished[b]) >= nb and worst(b) >= best_running / (cur_len**length_penalty):
                done[b] = True
        # (float64 holds the float32 scores and the token and beam indices exactly)
        packed = torch.tensor(nxt, dtype=torch.float64).to(dev)
        next_scores, next_tok, next_src = packed[..., 0].float(), packed[..., 1].long(), packed[..., 2].long()
        if on_token is not None:
            on_token(t)
        src = (next_src + torch.arange(B, device=dev)[:, None] * nb).view(-1)
        seqs = torch.cat([seqs[src], next_tok.view(-1, 1)], dim=1)
        scores = next_scores
        if all(done):
            break
        state.reorder(src)
        tok = next_tok.view(-1)

    best = []
    for b in range(B):
        if not done[b]:
            for j in range(nb):
                s = scores[b, j].item()
                if s <= -1e8:
                    continue
                score = s / (seqs.shape[1] ** length_penalty)
                if len(finished[b]) < nb or score > worst(b):
                    finished[b].append((score, seqs[b * nb + j]))
                    finished[b].sort(key=lambda x: -x[0])
                    del finished[b][nb:]
        best.append(finished[b][0][1])
    n = max(len(h) for h in best)
    out = torch.full((B, n), cfg.pad_token_id, dtype=torch.long, device=dev)
    for b, h in enumerate(best):
        out[b, : len(h)] = h
    return out


def generate(model: Switch, input_ids, attention_mask=None, max_new_tokens=32, num_beams=1, **kw) -> torch.Tensor:
    if num_beams <= 1:
        return greedy(model, input_ids, attention_mask, max_new_tokens, **kw)
    return beam_search(model, input_ids, attention_mask, max_new_tokens, num_beams=num_beams, **kw)
