"""Differentiable grouped expert FFN for training on the GPU: tokens sorted by expert, padded per
expert to a multiple of 16 rows, two grouped GEMMs (torch._grouped_mm, bf16, sm90+) with autograd
and no host synchronisation (expert_ffn_reference loops over experts after a .tolist()).
models/moe.py uses it for the training path when a module's `train_backend` is "grouped"
(train/experts.py checks it against the reference once and sets that).

Legend: N tokens, D model width, F expert hidden width, E experts, P padded rows (N + 16 E).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.expert_ffn import _act

ALIGN = 16


def grouped_expert_ffn(
    x_ND: torch.Tensor,
    w_in_EFD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    ids_N1: torch.Tensor,
    weights_N1: torch.Tensor,
    activation: str = "relu",
    dropout: float = 0.0,
) -> torch.Tensor:
    """y[t] = weights[t] * W_out[e] @ drop(act(W_in[e] @ x[t])), e = ids[t]; top-1; bf16 compute, x's
    dtype out. `dropout` inside each expert after the activation, as transformers' Switch does."""
    N, D = x_ND.shape
    E = w_in_EFD.shape[0]
    e_N = ids_N1.reshape(-1).long()
    counts_E = torch.bincount(e_N, minlength=E)
    padded_E = (counts_E + ALIGN - 1) // ALIGN * ALIGN
    end_E = torch.cumsum(padded_E, 0)
    start_E = end_E - padded_E
    order_N = torch.argsort(e_N, stable=True)
    first_E = torch.cumsum(counts_E, 0) - counts_E
    e_sorted = e_N[order_N]
    rank_N = torch.arange(N, device=x_ND.device) - first_E[e_sorted]
    row_N = start_E[e_sorted] + rank_N  # padded row of each sorted token
    P = N + ALIGN * E  # static upper bound: no sync
    x_PD = x_ND.new_zeros((P, D), dtype=torch.bfloat16)
    x_PD = x_PD.index_copy(0, row_N, x_ND[order_N].to(torch.bfloat16))
    offs = end_E.to(torch.int32)
    h_PF = torch._grouped_mm(x_PD, w_in_EFD.to(torch.bfloat16).transpose(-2, -1), offs=offs)
    h_PF = _act(h_PF, activation)
    if dropout > 0:
        h_PF = F.dropout(h_PF, dropout, training=True)
    y_PD = torch._grouped_mm(h_PF, w_out_EDF.to(torch.bfloat16).transpose(-2, -1), offs=offs)
    y_sorted = y_PD.index_select(0, row_N) * weights_N1.reshape(-1)[order_N, None].to(torch.bfloat16)
    return torch.zeros_like(x_ND).index_copy(0, order_N, y_sorted.to(x_ND.dtype))


def grouped_available(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(device)[0] >= 9
    )
