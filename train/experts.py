"""A differentiable expert FFN for training on the GPU: tokens sorted by expert, padded per expert to
a multiple of 16 rows, two grouped GEMMs (torch._grouped_mm, bf16, sm90+) with autograd; no host
synchronisation (kernels.expert_ffn.expert_ffn_reference loops over experts after a .tolist()).

`install(model, mode)` swaps SparseMLP.experts on each MoE block of a model (models/ stays as it
is); "auto" checks the grouped path against the reference once and falls back if it is missing or
disagrees.

Legend: N tokens, D model width, F expert hidden width, E experts, P padded rows (N + 16 E).
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F

from kernels.expert_ffn import _act, expert_ffn_reference

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


def _grouped_experts(self, x_BSD: torch.Tensor, routing) -> torch.Tensor:
    # Replaces SparseMLP.experts while training (grad on, no offloading; expert dropout included).
    if not torch.is_grad_enabled() or self.expert_source is not None or routing.ids.shape[-1] != 1:
        return type(self).experts(self, x_BSD, routing)
    B, S, D = x_BSD.shape
    y = grouped_expert_ffn(
        x_BSD.reshape(B * S, D),
        self.w_in,
        self.w_out,
        routing.ids,
        routing.weights,
        self.activation,
        self.dropout.p if self.training else 0.0,
    )
    return y.view(B, S, D)


def grouped_available(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def check_grouped(device: torch.device, activation: str = "relu") -> str | None:
    """None when the grouped path matches the reference (forward and gradients) on a small
    problem with an empty expert and uneven loads; otherwise the reason."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        N, D, Fh, E = 70, 64, 128, 5
        x = torch.randn(N, D, generator=g).to(device).requires_grad_()
        wi = (torch.randn(E, Fh, D, generator=g) * D**-0.5).to(device).requires_grad_()
        wo = (torch.randn(E, D, Fh, generator=g) * Fh**-0.5).to(device).requires_grad_()
        ids = torch.randint(0, E - 1, (N, 1), generator=g).to(device, torch.int32)  # expert E-1 empty
        w = torch.rand(N, 1, generator=g).to(device)
        gy = torch.randn(N, D, generator=g).to(device)
        outs = []
        for fn in (
            grouped_expert_ffn,
            lambda *a: expert_ffn_reference(
                a[0].bfloat16(), a[1].bfloat16(), a[2].bfloat16(), a[3], a[4], None, a[5]
            ).float(),
        ):
            y = fn(x, wi, wo, ids, w, activation)
            gx, gwi, gwo = torch.autograd.grad(y, (x, wi, wo), gy)
            outs.append((y, gx, gwi, gwo))
        for name, a, b in zip(("y", "dx", "dw_in", "dw_out"), outs[0], outs[1]):
            err = (a.float() - b.float()).abs().max().item()
            scale = b.float().abs().max().item() + 1e-6
            if not err <= 3e-2 * scale:
                return f"{name} differs from the reference: max abs err {err:.3g} (scale {scale:.3g})"
        return None
    except Exception as e:  # missing op, unsupported GPU, shape constraints
        return f"{type(e).__name__}: {e}"


def install(model, mode: str, device: torch.device) -> str:
    """Choose the training path of the expert FFN: 'grouped' | 'reference' | 'auto'. Returns the one used."""
    if mode not in ("auto", "grouped", "reference"):
        raise ValueError(f"train.expert_backend={mode!r}; expected auto, grouped or reference")
    if mode == "reference" or (mode == "auto" and not grouped_available(device)):
        return "reference"
    act = model.cfg.dense_act_fn
    reason = check_grouped(device, act)
    if reason is not None:
        if mode == "grouped":
            raise RuntimeError(f"train.expert_backend=grouped is unusable here: {reason}")
        warnings.warn(f"grouped expert FFN unusable ({reason}); using the reference loop", stacklevel=2)
        return "reference"
    for moe in model.moes:
        moe.experts = types.MethodType(_grouped_experts, moe)
    return "grouped"
