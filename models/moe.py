"""The sparse MoE FFN of a Switch block: a router (or a routing handed in by an earlier pre-gate),
stacked expert weights, and an optional pre-gate that routes a later MoE block.

Legend: B batch, S sequence, N = B*S tokens, D model width, F expert hidden width, E experts.

The routing decision is an explicit value (`Routing`): callers can read it (the offload runner
prefetches from it) and supply it (a pre-gated block is routed by an earlier block's pre-gate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import expert_ffn as _ffn
from kernels import routing as _routing
from kernels.grouped_ffn import grouped_expert_ffn
from models.config import ACTIVATIONS, SwitchConfig

BACKENDS = ("torch", "triton")


@dataclass
class Routing:
    """Top-k routing of N tokens: ids [N, k] (int), weights [N, k] (fp32, 0 where capacity dropped
    the token), and the fp32 gate logits [N, E] when they were computed (training, losses)."""

    ids: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor | None = None


class ExpertSource(Protocol):
    """Where a MoE block's expert weights live at compute time (the offload runner's hook)."""

    def prefetch(self, routing: Routing) -> None:
        """The routing of this block became known early (a pre-gate ran): start copying."""

    def fetch(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Weights to compute `routing` with: (w_in [S, F, D], w_out [S, D, F], slot_of_expert [E] or None)."""

    # Optional: `observe(x_BSD)` is called with the block's FFN input just before `fetch`, when the
    # source defines it (a speculative policy applies a later block's router to it).
    # Optional: `split(x_BSD, routing) -> (routing, extra)` is called just after `fetch`: the experts
    # compute the returned routing (the source may zero the weights of tokens it computes itself),
    # and `extra` (None, or a callable returning a [B, S, D] partial output, called after the
    # expert FFN is launched so the two can overlap) is added to their output (the offload runner's
    # CPU compute of missed experts).
    # Optional: `step_start(tokens_B)` is called on the decoder's first MoE block's source at the start of each
    # decode step (Switch.decode_one_token, inside a captured step): the offload runner guesses from the
    # tokens the experts of the blocks no pre-gate routes and starts their copies (infer/policies.py).
    # Optional: `chunks(routing)` is called first, when the source defines it: None (then fetch as
    # usual), or an iterable of (w_in, w_out, slot_of_expert, tok [n] token ids, in_chunk [E] bool):
    # the experts computed chunk by chunk through a few slots (the offload runner's prefill streaming).
    # Each chunk computes the tokens tok routed to its experts (with k > 1 the other experts' weights
    # are zeroed); the outputs are summed into zeros, so with k = 1 each token's output is bitwise the
    # unchunked one (same rows per expert, added once to zero).


def apply_capacity(ids_BSk: torch.Tensor, weights_BSk: torch.Tensor, capacity: int | None, num_experts: int):
    """Per-sequence expert capacity with transformers' semantics: in each sequence, the first
    `capacity` tokens (in position order) sent to an expert are kept; later ones get a zero
    expert output (their weight becomes 0)."""
    if capacity is None:
        return weights_BSk
    B, S, k = ids_BSk.shape
    onehot = F.one_hot(ids_BSk.reshape(B, S * k).long(), num_experts)  # [B, S*k, E]
    priority = torch.cumsum(onehot, dim=1)
    keep = ((priority <= capacity) & (onehot > 0)).any(-1).reshape(B, S, k)
    return weights_BSk * keep.to(weights_BSk.dtype)


def gate_logits(x_ND: torch.Tensor, gate: nn.Linear) -> torch.Tensor:
    """fp32 gate logits; the router runs in fp32 whatever the model dtype (selective precision),
    autocast included."""
    bias = gate.bias.float() if gate.bias is not None else None
    with torch.autocast(x_ND.device.type, enabled=False):
        return F.linear(x_ND.float(), gate.weight.float(), bias)


def routing_from_logits(logits_NE: torch.Tensor, shape_BS: tuple[int, int], capacity: int | None) -> Routing:
    probs = torch.softmax(logits_NE, dim=-1)
    w, i = probs.max(dim=-1, keepdim=True)  # ties: lower index (first maximum)
    B, S = shape_BS
    w = apply_capacity(i.view(B, S, 1), w.view(B, S, 1), capacity, logits_NE.shape[-1]).view(-1, 1)
    return Routing(ids=i.to(torch.int32), weights=w, logits=logits_NE)


class SparseMLP(nn.Module):
    """Router + E experts (ReLU FFN, no bias) stored stacked, + an optional pre-gate."""

    def __init__(self, cfg: SwitchConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.capacity = cfg.capacity
        self.jitter = cfg.router_jitter_noise
        self.activation = ACTIVATIONS[cfg.dense_act_fn]
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=cfg.router_bias)
        self.w_in = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_ff, cfg.d_model))   # [E, F, D]
        self.w_out = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model, cfg.d_ff))  # [E, D, F]
        self.pregate: nn.Linear | None = None  # routes MoE block (this + lookahead) of the same stack
        self.uses_own_router = True            # False for blocks routed by an earlier pre-gate
        self.backend = "torch"
        # training path of the expert FFN: "reference" (per-expert loop) or "grouped"
        # (kernels/grouped_ffn.py: grouped GEMMs, no host sync; GPUs with torch._grouped_mm)
        self.train_backend = "reference"
        self.expert_source: ExpertSource | None = None

    def add_pregate(self, init_from: nn.Linear) -> None:
        self.pregate = nn.Linear(init_from.in_features, init_from.out_features, bias=init_from.bias is not None)
        self.pregate.to(device=init_from.weight.device, dtype=init_from.weight.dtype)
        with torch.no_grad():
            self.pregate.weight.copy_(init_from.weight)
            if init_from.bias is not None:
                self.pregate.bias.copy_(init_from.bias)

    # -- routing -----------------------------------------------------------------------------
    def _jitter(self, x_ND: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter > 0:
            x_ND = x_ND.float() * torch.empty_like(x_ND, dtype=torch.float32).uniform_(
                1.0 - self.jitter, 1.0 + self.jitter
            )
        return x_ND

    def gates(
        self, x_BSD: torch.Tensor, need_own: bool, need_logits: bool = False
    ) -> tuple[Routing | None, Routing | None]:
        """(own routing, pre-gate routing for the later block); each None when not needed.
        need_logits: keep the fp32 gate logits (router losses), which the fused kernel does not return."""
        B, S, D = x_BSD.shape
        x_ND = self._jitter(x_BSD.reshape(B * S, D))
        gates = ([self.router] if need_own else []) + ([self.pregate] if self.pregate is not None else [])
        if not gates:
            return None, None
        # The fused kernel has no capacity logic: use it only when no token can be dropped.
        no_drop = self.capacity is None or S <= self.capacity
        fast = self.backend == "triton" and not torch.is_grad_enabled() and no_drop and not need_logits
        if fast and all(g.bias is None for g in gates):
            w_GED = torch.stack([g.weight for g in gates]) if len(gates) > 1 else gates[0].weight[None]
            ids, weights = _routing.route(x_ND, w_GED, k=1)
            out = [Routing(ids=ids[g], weights=weights[g]) for g in range(len(gates))]
        else:
            out = [routing_from_logits(gate_logits(x_ND, g), (B, S), self.capacity) for g in gates]
        own = out.pop(0) if need_own else None
        pre = out.pop(0) if self.pregate is not None else None
        return own, pre

    # -- experts -----------------------------------------------------------------------------
    def experts(self, x_BSD: torch.Tensor, routing: Routing) -> torch.Tensor:
        B, S, D = x_BSD.shape
        chunks = getattr(self.expert_source, "chunks", None)
        parts = chunks(routing) if chunks is not None else None
        if parts is not None:
            return self._experts_chunked(x_BSD, routing, parts)
        if self.expert_source is not None:
            observe = getattr(self.expert_source, "observe", None)  # optional hook (speculative prefetch)
            if observe is not None:
                observe(x_BSD)
            w_in, w_out, slots = self.expert_source.fetch(routing)
        else:
            w_in, w_out, slots = self.w_in, self.w_out, None
        extra = None
        split = getattr(self.expert_source, "split", None)  # optional hook (CPU compute of misses)
        if split is not None:
            routing, extra = split(x_BSD, routing)
        fn = self._ffn()
        grouped = self.train_backend == "grouped" and torch.is_grad_enabled()
        if grouped and slots is None and extra is None and routing.ids.shape[-1] == 1:
            drop = self.dropout.p if self.training else 0.0
            y_ND = grouped_expert_ffn(x_BSD.reshape(B * S, D), w_in, w_out, routing.ids, routing.weights,
                                      self.activation, drop)
            y_BSD = y_ND.view(B, S, D)
        elif self.training and self.dropout.p > 0:
            # transformers applies dropout inside each expert, after the activation
            y_BSD = self._experts_with_dropout(x_BSD, routing, w_in, w_out, slots)
        else:
            x_ND = x_BSD.reshape(B * S, D)
            y_BSD = fn(x_ND, w_in, w_out, routing.ids, routing.weights, slots, self.activation).view(B, S, D)
        return y_BSD if extra is None else y_BSD + extra()

    def _ffn(self):
        """The expert FFN: the Triton kernels (backend triton, no grad) or the differentiable reference."""
        fast = self.backend == "triton" and not torch.is_grad_enabled()
        return _ffn.expert_ffn if fast else _ffn.expert_ffn_reference

    def _experts_chunked(self, x_BSD, routing, parts):
        B, S, D = x_BSD.shape
        x_ND = x_BSD.reshape(B * S, D)
        fn = self._ffn()
        # the Triton FFN takes the whole block's config (path, tiles) for every chunk, as gpu_only's one call
        kw = {"config_tokens": B * S} if fn is _ffn.expert_ffn else {}
        y = torch.zeros_like(x_ND)
        for w_in, w_out, slots, tok, in_chunk in parts:
            if tok.numel() == 0:
                continue
            ids = routing.ids[tok]
            w = routing.weights[tok]
            if ids.shape[-1] > 1:
                w = torch.where(in_chunk[ids.long()], w, 0.0)
            y.index_add_(0, tok, fn(x_ND[tok], w_in, w_out, ids, w, slots, self.activation, **kw))
        return y.view(B, S, D)

    def _experts_with_dropout(self, x_BSD, routing, w_in, w_out, slots):
        B, S, D = x_BSD.shape
        x_ND = x_BSD.reshape(B * S, D)
        ids = routing.ids.reshape(-1).long()
        if slots is not None:
            ids = slots.long()[ids]
        y = torch.zeros_like(x_ND)
        for e in torch.unique(ids).tolist():
            tok = (ids == e).nonzero(as_tuple=True)[0]
            h = self.dropout(_ffn._act(x_ND[tok].to(w_in.dtype) @ w_in[e].t(), self.activation))
            out = (h @ w_out[e].t()) * routing.weights.reshape(-1)[tok, None].to(h.dtype)
            y = y.index_add(0, tok, out.to(x_ND.dtype))
        return y.view(B, S, D)
