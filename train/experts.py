"""Choosing the expert FFN's training path: the grouped GEMM of kernels/grouped_ffn.py (GPUs with
torch._grouped_mm, no host sync) or the reference loop. `install(model, mode)` sets
SparseMLP.train_backend on every MoE block; "auto" checks the grouped path against the reference
once and falls back if it is missing or disagrees.
"""

from __future__ import annotations

import warnings

import torch

from kernels.expert_ffn import expert_ffn_reference
from kernels.grouped_ffn import grouped_available, grouped_expert_ffn

__all__ = ["check_grouped", "grouped_available", "grouped_expert_ffn", "install"]


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
        moe.train_backend = "grouped"
    return "grouped"
