"""Sparse expert FFN: y[t] = sum_j w[t, j] * W_out[s] @ act(W_in[s] @ x[t]), s = slot_of_expert[ids[t, j]].

Legend: T tokens, d model width, F expert hidden width, S weight slots, E experts, k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "silu", "geglu", "swiglu")


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
    summed into the output (as transformers' Switch model does).
    """
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
        h = _act(x[tok].to(w_in.dtype) @ w_in[s].t(), activation)
        out = (h @ w_out[s].t()) * weights.reshape(-1)[rows, None].to(h.dtype)
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
) -> torch.Tensor:
    return expert_ffn_reference(x, w_in, w_out, ids, weights, slot_of_expert, activation)
