"""Routing: gate logits -> softmax -> top-k.

Legend: T tokens, d model width, E experts, G stacked gates, k experts per token.
"""

from __future__ import annotations

import torch


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
    return route_reference(x, weight, k=k, renormalize=renormalize)
