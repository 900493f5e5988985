"""T5 RMS layer norm as one kernel for inference: y = w * cast(x * rsqrt(mean(x^2) + eps)).

Why: the PyTorch form is six kernels (cast, square, mean, add, rsqrt, two multiplies); on the
decode path each is a launch of a few microseconds, three norms per decoder block.

add_rmsnorm also takes the residual add before the norm (s = h + y, then the norm of s; both returned):
every norm of a Switch block follows a residual add, so the add's own kernel (36 per switch-base-128
decode step) goes. Its s is torch's h + y bit for bit (the sum in fp32, rounded once to the dtype).

Legend: N rows, D width.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, D, stride_xn, stride_yn, eps,
                        CAST_TO_W: tl.constexpr, BLOCK_D: tl.constexpr):
        n = tl.program_id(0)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        x = tl.load(x_ptr + n * stride_xn + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        h = x * rstd
        if CAST_TO_W:  # as the reference: normalise in fp32, round to the weight's dtype, then scale
            h = h.to(w.dtype).to(tl.float32)
        y = w.to(tl.float32) * h
        tl.store(y_ptr + n * stride_yn + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _add_rmsnorm_kernel(h_ptr, y_ptr, w_ptr, s_ptr, o_ptr, D, stride_hn, stride_yn, stride_sn, stride_on, eps,
                            CAST_TO_W: tl.constexpr, BLOCK_D: tl.constexpr):
        n = tl.program_id(0)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        h = tl.load(h_ptr + n * stride_hn + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + n * stride_yn + offs, mask=mask, other=0.0).to(tl.float32)
        s = (h + y).to(s_ptr.dtype.element_ty)  # rounded as torch's add rounds it
        tl.store(s_ptr + n * stride_sn + offs, s, mask=mask)
        x = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        r = x * rstd
        if CAST_TO_W:
            r = r.to(w.dtype).to(tl.float32)
        o = w.to(tl.float32) * r
        tl.store(o_ptr + n * stride_on + offs, o.to(o_ptr.dtype.element_ty), mask=mask)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(var + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(weight.dtype)
    return weight * h


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, force_triton: bool = False) -> torch.Tensor:
    """One-kernel RMS norm (no autograd); the reference on the CPU or without Triton
    (force_triton: run the kernel anyway, for tests under TRITON_INTERPRET=1)."""
    if not HAVE_TRITON or not (x.is_cuda or force_triton):
        return rmsnorm_reference(x, weight, eps)
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    half = weight.dtype in (torch.float16, torch.bfloat16)
    out_dtype = weight.dtype if half else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    _rmsnorm_kernel[(x2.shape[0],)](x2, weight, y, D, x2.stride(0), y.stride(0), eps,
                                    CAST_TO_W=half, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return y.view(*x.shape[:-1], D)


def add_rmsnorm_supported(h: torch.Tensor, y: torch.Tensor, force_triton: bool = False) -> bool:
    """Whether add_rmsnorm runs its kernel for h + y: Triton there (CUDA, or force_triton), the same shape and
    dtype (no broadcast or promotion), and not fp16 (whose residual the model clamps after the add)."""
    return (HAVE_TRITON and (h.is_cuda or force_triton) and h.shape == y.shape and h.dtype == y.dtype
            and h.dtype in (torch.float32, torch.bfloat16) and h.device == y.device)


def add_rmsnorm(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                force_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rmsnorm(s)) for s = h + y, in one kernel (no autograd) where add_rmsnorm_supported; else torch's add and
    rmsnorm(). s is torch's h + y exactly; the norm is rmsnorm()'s of s exactly."""
    if not add_rmsnorm_supported(h, y, force_triton):
        s = h + y
        return s, rmsnorm(s, weight, eps, force_triton=force_triton)
    D = h.shape[-1]
    h2, y2 = h.reshape(-1, D), y.reshape(-1, D)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    if y2.stride(-1) != 1:
        y2 = y2.contiguous()
    half = weight.dtype in (torch.float16, torch.bfloat16)
    out_dtype = weight.dtype if half else torch.promote_types(h.dtype, weight.dtype)
    s = torch.empty(h2.shape, dtype=h.dtype, device=h.device)
    o = torch.empty(h2.shape, dtype=out_dtype, device=h.device)
    _add_rmsnorm_kernel[(h2.shape[0],)](h2, y2, weight, s, o, D, h2.stride(0), y2.stride(0), s.stride(0), o.stride(0),
                                        eps, CAST_TO_W=half, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return s.view(h.shape), o.view(*h.shape[:-1], D)
