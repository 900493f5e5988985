"""Attention of one query per (row, head) over a key/value cache, as one Triton kernel: the decode step's
self- and cross-attention.

Why: the decode step's attention through torch's scaled_dot_product_attention picks cuDNN's kernel on the H200
(torch 2.11), which returned different last bits for the same q/k/v/bias in back-to-back calls on the model's
cross-attention inputs (bench/results/probe-policy-equality-h200.md), so gpu_only was not repeatable and no
policy could match it bitwise; the memory-efficient backend repeats but took 14.5 vs 6.8 us per call (batch 1,
256 keys). This kernel reads each key and value once, in a fixed order (one program per (row, head), an online
softmax over blocks of keys in fp32), so its result depends only on its inputs.

    out[b, h] = softmax(scale * q[b, h] . k[b, h, j] + bias[b, h, j] over j) @ v[b, h]

Legend: B rows, H heads, K keys, D head width; bias broadcastable to [B, H, 1, K] (T5's position bias and
causal mask for self-attention, the padding mask for cross-attention).
"""

from __future__ import annotations

import torch

from kernels.routing import HAVE_TRITON, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl


    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, K, D, scale,
        sq_b, sq_h, sq_d, sk_b, sk_h, sk_k, sk_d, sv_b, sv_h, sv_k, sv_d, sb_b, sb_h, sb_k, so_b, so_h, so_d,
        H: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_d * sq_d, mask=dmask, other=0.0).to(tl.float32) * scale
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        m = tl.full([1], float("-inf"), tl.float32)
        l_sum = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            tile = kmask[:, None] & dmask[None, :]
            kt = tl.load(k_base + offs_k[:, None] * sk_k + offs_d[None, :] * sk_d, mask=tile, other=0.0)
            s = tl.sum(kt.to(tl.float32) * q[None, :], axis=1)  # [BLOCK_K]
            if HAS_BIAS:
                s += tl.load(bias_ptr + b * sb_b + h * sb_h + offs_k * sb_k, mask=kmask, other=0.0).to(tl.float32)
            s = tl.where(kmask, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of -inf scores only: no NaN
            p = tl.exp(s - m_use)
            alpha = tl.exp(m - m_use)
            vt = tl.load(v_base + offs_k[:, None] * sv_k + offs_d[None, :] * sv_d, mask=tile, other=0.0)
            l_sum = l_sum * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
            m = m_new
        out = acc / l_sum
        tl.store(out_ptr + b * so_b + h * so_h + offs_d * so_d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                               scale: float = 1.0) -> torch.Tensor:
    """The same in plain PyTorch (fp32 scores, softmax and sums), output in q's dtype."""
    s = scale * (q.float() @ k.float().transpose(-1, -2))
    if bias is not None:
        s = s + bias.float()
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)


def default_config(K: int, D: int) -> dict:
    """Keys per block and warps: the whole cache in one block up to 256 keys (128 for heads wider than 64), 4 warps.
    Measured on the H200 (bench/results/probe-decode-attention-h200.md, us per call in a CUDA graph, 64-wide
    heads): 256 keys, batch 1: 3.54 with 256-key blocks, 6.66 with 128, 9.74 with 64 (cuDNN's SDPA 6.82);
    batch 32: 6.73 / 8.98 / 12.68 (cuDNN 11.11); 64 keys: 3.39 (batch 1), 4.49 (batch 32; cuDNN 3.41, 7.87)."""
    cap = 256 if D <= 64 else 128
    return {"BLOCK_K": max(16, min(cap, triton.next_power_of_2(K))), "num_warps": 4}


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                     scale: float = 1.0, config: dict | None = None) -> torch.Tensor:
    """q [B, H, 1, D]; k, v [B, H, K, D]; bias None or broadcastable to [B, H, 1, K] -> [B, H, 1, D] in q's dtype.
    Any strides (views are read as they are). One program per (row, head); the keys in a fixed order."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode_attention: q must be [B, H, 1, D], got {tuple(q.shape)}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"decode_attention: k and v must be [B={B}, H={H}, K, D={D}], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    K = k.shape[2]
    if bias is not None and not bias.is_floating_point():
        raise ValueError(f"decode_attention: bias must be an additive float mask, got {bias.dtype} (for a boolean "
                         "mask pass torch.zeros(...).masked_fill(~mask, torch.finfo(dtype).min))")
    out = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    if bias is not None:
        try:
            bias = bias.expand(B, H, 1, K)  # broadcast dims get stride 0
        except RuntimeError as e:
            raise ValueError(f"decode_attention: bias {tuple(bias.shape)} does not broadcast to "
                             f"[{B}, {H}, 1, {K}]") from e
        sb = (bias.stride(0), bias.stride(1), bias.stride(3))
    else:
        sb = (0, 0, 0)
    cfg = config or default_config(K, D)
    _decode_attention_kernel[(B * H,)](
        q, k, v, bias if bias is not None else q, out, K, D, float(scale),
        q.stride(0), q.stride(1), q.stride(3), k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3), *sb, out.stride(0), out.stride(1), out.stride(3),
        H=H, HAS_BIAS=bias is not None, BLOCK_K=cfg["BLOCK_K"], BLOCK_D=triton.next_power_of_2(D),
        num_warps=cfg["num_warps"],
    )
    return out


def use_decode_attention(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the kernel serves this call: Triton where the other kernels run (kernels.routing.use_triton: CUDA
    tensors, on the CPU only under the interpreter with PGMOE_FORCE_TRITON=1), no gradient, one query, a float dtype,
    a head width the registers hold and an additive (float) bias or none."""
    return (use_triton(q) and not torch.is_grad_enabled() and q.dim() == 4 and q.shape[2] == 1
            and q.dtype == k.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256 and (bias is None or bias.is_floating_point()))


__all__ = ["decode_attention", "decode_attention_reference", "default_config", "use_decode_attention", "HAVE_TRITON"]
