"""Switch Transformer: a T5-style encoder-decoder with a sparse MoE FFN in every other block.

Reproduces transformers' SwitchTransformersForConditionalGeneration (same function, same
checkpoint keys through models/checkpoint.py), with two additions: the pre-gate chain
(models/pregate.py sets it up; the stack runs it) and a static KV cache whose decode step
reads the position from a device tensor, so the step can be captured as a CUDA graph.

Legend: B batch, S encoder length, T decoder length, Q query length, K key length,
D d_model, H heads, Dh d_kv, V vocabulary, M MoE blocks in a stack, E experts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels.expert_ffn as _ffn
from kernels.decode_attention import decode_attention, use_decode_attention
from kernels.kv_reorder import reorder_reference, reorder_written
from kernels.kv_reorder import supported as kv_reorder_supported
from kernels.rmsnorm import add_rmsnorm, add_rmsnorm_supported, rmsnorm, rmsnorm_reference
from kernels.routing import use_triton
from models.config import SwitchConfig
from models.moe import BACKENDS, Routing, SparseMLP


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, variance in fp32."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not torch.is_grad_enabled():
            return rmsnorm(x, self.weight, self.eps)  # one kernel instead of six on the decode path
        return rmsnorm_reference(x, self.weight, self.eps)


def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucketing of (key position - query position)."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, rel, large)


class Attention(nn.Module):
    def __init__(self, cfg: SwitchConfig, relative_bias: bool, decoder: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.h, self.dh = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.dropout = cfg.dropout_rate
        self.decoder = decoder
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.relative_attention_bias = nn.Embedding(self.num_buckets, self.h) if relative_bias else None
        self._qkv_weight: torch.Tensor | None = None  # [3 * H * Dh, D], q/k/v are views of it (fuse_qkv)
        # one query (a decode step): kernels/decode_attention.py instead of SDPA (set_backend("triton"))
        self.decode_kernel = False

    def position_bias(self, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
        """[1, H, Q, K] bias for query positions q_pos [Q] against keys 0..k_len-1."""
        rel = torch.arange(k_len, device=q_pos.device)[None, :] - q_pos[:, None]
        b = relative_position_bucket(rel, not self.decoder, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(b).permute(2, 0, 1)[None]

    def heads(self, proj: nn.Linear, x_BQD: torch.Tensor) -> torch.Tensor:
        B, Q, _ = x_BQD.shape
        return proj(x_BQD).view(B, Q, self.h, self.dh).transpose(1, 2)  # [B, H, Q, Dh]

    def qkv(self, x_BQD: torch.Tensor):
        """(q, k, v, kv): the heads, and under no_grad with fused weights (fuse_qkv; then one matrix product) kv, the
        keys and values as one [2, B, H, Q, Dh] view of that product (else None), for a single cache write."""
        w = self._qkv_weight
        if w is None or torch.is_grad_enabled() or not self.qkv_fused():
            return self.heads(self.q, x_BQD), self.heads(self.k, x_BQD), self.heads(self.v, x_BQD), None
        B, Q, _ = x_BQD.shape
        qkv = F.linear(x_BQD, w).view(B, Q, 3, self.h, self.dh)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        return q, k, v, qkv[:, :, 1:].permute(2, 0, 3, 1, 4)

    def qkv_fused(self) -> bool:
        """True while q, k and v are still the three row blocks of the fused matrix (a dtype or
        device change, or a load, gives them new storage)."""
        w = self._qkv_weight
        return w is not None and self.q.weight.data_ptr() == w.data_ptr() and self.q.weight.dtype == w.dtype

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Put q, k, v into one [3 * H * Dh, D] matrix and make the three weights views of its row
        blocks: no extra memory, training updates stay visible, one launch instead of three."""
        if self.qkv_fused():
            return
        w = torch.cat([self.q.weight, self.k.weight, self.v.weight])
        n = self.q.weight.shape[0]
        self.q.weight.data, self.k.weight.data, self.v.weight.data = w[:n], w[n : 2 * n], w[2 * n :]
        self._qkv_weight = w

    def attend(self, q_BHQd, k_BHKd, v_BHKd, bias) -> torch.Tensor:
        # T5 does not scale q.k: the scale is folded into the initialisation of q.
        drop = self.dropout if self.training else 0.0
        if self.decode_kernel and drop == 0.0 and use_decode_attention(q_BHQd, k_BHKd, bias):
            out = decode_attention(q_BHQd, k_BHKd, v_BHKd, bias, scale=1.0)  # deterministic (its docstring)
        else:
            out = F.scaled_dot_product_attention(q_BHQd, k_BHKd, v_BHKd, attn_mask=bias, dropout_p=drop, scale=1.0)
        B, H, Q, dh = out.shape
        return self.o(out.transpose(1, 2).reshape(B, Q, H * dh))


class DenseFF(nn.Module):
    def __init__(self, cfg: SwitchConfig):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.act_name = cfg.dense_act_fn
        self.act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[cfg.dense_act_fn]
        # the decode kernels' tiles for this shape are tuned under the model's expert count (kernels/configs)
        self.config_experts = cfg.num_experts
        # (rows, device, dtype) -> (ids, weights, the kernels' config): one expert of routing weight 1 for every row
        self._one_expert: dict[tuple, tuple[torch.Tensor, torch.Tensor, dict]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_kernels(x):
            return self._forward_decode(x)
        h = self.dropout(self.act(self.wi(x)))
        return self.wo(h.to(self.wo.weight.dtype))

    def decode_kernels(self, x: torch.Tensor) -> bool:
        """Inference on CUDA over a few rows (a decode step): the layer as one expert of the expert FFN's decode
        kernels (two launches: w_in with the activation, then w_out) instead of two matrix products and the
        activation between (four launches with cuBLAS's split-K reduce). Where Triton runs (kernels.routing.use_triton:
        on the CPU under the interpreter with PGMOE_FORCE_TRITON=1, tests). PGMOE_DENSE_KERNEL=0: off (bench variant
        #densemm)."""
        w = self.wi.weight
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return (use_triton(x) and not torch.is_grad_enabled()
                and not self.training and 0 < rows <= _ffn.DECODE_MAX_SLOTS
                and x.dtype == w.dtype == self.wo.weight.dtype and os.environ.get("PGMOE_DENSE_KERNEL", "1") != "0")

    def _forward_decode(self, x: torch.Tensor) -> torch.Tensor:
        D = x.shape[-1]
        x2 = x.reshape(-1, D)
        T = x2.shape[0]
        w_in, w_out = self.wi.weight[None], self.wo.weight[None]  # [1, F, D], [1, D, F]
        key = (T, x.device, x.dtype)
        if key not in self._one_expert:  # made once per row count (eagerly, before a captured step replays it)
            self._one_expert[key] = (
                torch.zeros((T, 1), dtype=torch.int32, device=x.device),
                torch.ones((T, 1), dtype=torch.float32, device=x.device),
                _ffn.choose_config(T, 1, self.config_experts, D, w_in.shape[1], self.act_name, x.dtype, w_in.dtype,
                                   x.device))
        ids, weights, cfg = self._one_expert[key]
        y = _ffn.expert_ffn_triton(x2, w_in, w_out, ids, weights, activation=self.act_name, config=cfg)
        return y.view(x.shape)


class Block(nn.Module):
    def __init__(self, cfg: SwitchConfig, index: int, decoder: bool, sparse: bool):
        super().__init__()
        self.self_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.self_attn = Attention(cfg, relative_bias=index == 0, decoder=decoder)
        if decoder:
            self.cross_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
            self.cross_attn = Attention(cfg, relative_bias=False, decoder=True)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ff: SparseMLP | DenseFF = SparseMLP(cfg) if sparse else DenseFF(cfg)
        self.sparse = sparse
        self.dropout = nn.Dropout(cfg.dropout_rate)


def _clamp_fp16(h: torch.Tensor) -> torch.Tensor:
    if h.dtype != torch.float16:
        return h
    limit = torch.finfo(torch.float16).max - 1000
    return torch.clamp(h, -limit, limit)


def add_norm(h: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, norm(h + delta)), the sum clamped in fp16 as _clamp_fp16; delta None: (h, norm(h)).

    Inference where Triton runs (CUDA; the CPU under the interpreter with PGMOE_FORCE_TRITON=1, tests): the add inside
    the norm's kernel (kernels/rmsnorm.py add_rmsnorm: the same numbers as the add then the norm; not fp16).
    PGMOE_ADD_NORM=0: the add, then the norm (bench variant #addops)."""
    if delta is None:
        return h, norm(h)
    if (not torch.is_grad_enabled() and use_triton(h) and add_rmsnorm_supported(h, delta, force_triton=True)
            and os.environ.get("PGMOE_ADD_NORM", "1") != "0"):
        return add_rmsnorm(h, delta, norm.weight, norm.eps, force_triton=True)
    h = _clamp_fp16(h + delta)
    return h, norm(h)


@dataclass
class DecodeState:
    """What the decoder needs between steps. Every buffer is allocated once (prefill), so the
    step's tensors keep their addresses, and `pos` is a device tensor advanced in place."""

    enc_bias: torch.Tensor                       # [B, 1, 1, S] additive encoder padding mask
    cross_k: list[torch.Tensor]                  # per decoder block [B, H, S, Dh]
    cross_v: list[torch.Tensor]
    self_k: list[torch.Tensor]                   # per decoder block [B, H, Tmax, Dh]
    self_v: list[torch.Tensor]
    pos: torch.Tensor                            # [1] long: index of the token being decoded
    max_len: int
    self_bias: torch.Tensor | None = None        # [Tmax, H, Tmax]: position bias + causal mask per query position
    enc_out: torch.Tensor | None = None          # [B, S, D]
    routings: list[Routing] = field(default_factory=list)  # encoder routings of the prefill
    self_kv: torch.Tensor | None = None          # [2, blocks, B, H, Tmax, Dh]: self_k and self_v are its views
    # beam search: the rows the self-attention caches take before the next step (set by the beam choice, applied
    # at the next step's start, then the identity again), and that identity; None: nothing deferred
    row_src: torch.Tensor | None = None          # [B] long
    row_identity: torch.Tensor | None = None     # [B] long

    @property
    def batch_size(self) -> int:
        return self.enc_bias.shape[0]

    def defer_reorder(self, rows: torch.Tensor) -> None:
        """Register `rows` [B] (a buffer the caller rewrites in place: beam search's choice of rows) as the self caches'
        reorder to apply at the start of each decode step (apply_deferred), after the step's first copies start."""
        self.row_src = rows
        self.row_identity = torch.arange(rows.numel(), dtype=rows.dtype, device=rows.device)
        self.clear_deferred()

    def clear_deferred(self) -> None:
        """No reorder pending: the deferred rows back to the identity."""
        if self.row_src is not None:
            self.row_src.copy_(self.row_identity)

    def apply_deferred(self) -> None:
        """The deferred reorder (defer_reorder), once: the rows then go back to the identity, so a step without a
        choice before it (a misuse: the choice rewrites them after every step) reorders nothing instead of twice."""
        if self.row_src is not None:
            self.reorder(self.row_src, cross=False)
            self.clear_deferred()

    def reorder_form(self) -> str:
        """How reorder moves the self caches: "written positions" (kernels/kv_reorder.py, in place, the positions
        below pos; the default where its kernel runs) or "gather" (every position; PGMOE_KV_REORDER=0 turns the
        kernel off)."""
        if (self.self_kv is not None and os.environ.get("PGMOE_KV_REORDER", "1") != "0"
                and kv_reorder_supported(self.self_kv.flatten(0, 1).flatten(3))):
            return "written positions"
        return "gather"

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Reorder the batch in place (beam search). cross=False: the self-attention caches only, for rows whose
        encoder side (cross-attention caches, padding bias) is the same wherever `index` moves them (the beams
        of one prompt, after their rows were made copies of one)."""
        bufs = (*self.cross_k, *self.cross_v, self.enc_bias) if cross else ()
        if self.self_kv is not None:  # self_k, self_v are its views: one launch for every block
            kv = self.self_kv.flatten(0, 1).flatten(3)  # [2 blocks, B, H, Tmax * Dh]
            if os.environ.get("PGMOE_KV_REORDER", "1") != "0":
                # the positions written so far only, in place (kernels/kv_reorder.py; off CUDA it gathers them all)
                reorder_written(kv, index, self.pos, unit=self.self_kv.shape[-1])
            else:  # the gather of every position (the lever's A/B switch)
                reorder_reference(kv, index)
        else:
            bufs += (*self.self_k, *self.self_v)
        for buf in bufs:
            buf.copy_(buf.index_select(0, index))


class Stack(nn.Module):
    """Encoder or decoder stack; runs the MoE blocks' gates and pre-gate chain."""

    def __init__(self, cfg: SwitchConfig, decoder: bool):
        super().__init__()
        self.decoder = decoder
        n = cfg.num_decoder_layers if decoder else cfg.num_layers
        sparse = set(cfg.sparse_layers(decoder))
        self.blocks = nn.ModuleList(Block(cfg, i, decoder, i in sparse) for i in range(n))
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.lookahead = cfg.lookahead
        # When set, pre-gated blocks also run their own (original) router, and the fraction of
        # tokens on which it agrees with the pre-gate's choice is kept in `agreement` (metrics).
        self.probe_agreement = False
        self.agreement: dict[int, torch.Tensor] = {}

    @property
    def moes(self) -> list[SparseMLP]:
        return [b.ff for b in self.blocks if b.sparse]

    def run(
        self,
        h: torch.Tensor,
        self_bias: torch.Tensor,
        *,
        cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        cross_bias: torch.Tensor | None = None,
        cache: tuple | None = None,
        need_logits: bool = False,
        split_last: bool = False,
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], list[Routing]]:
        """h [B, Q, D] (embedded, pre-dropout) -> (final hidden [B, Q, D], routing used per MoE block).

        self_bias: position bias + mask, broadcastable to [B, H, Q, K]. cache: (self_k, self_v, pos, self_kv)
        to write this step's keys/values at `pos` and attend over the whole buffer (self_kv [2, blocks, B, H, Tmax,
        Dh] or None: the buffer self_k and self_v are views of, both written in one launch); pos is advanced by one
        right after the last block's write (off the end of the step, where the LM head waits). split_last
        (inference, not fp16): (the last block's residual input, its feed-forward output) instead of the final
        hidden state final_norm(residual + output), for a head that takes the sum and the norm in its kernel.
        """
        if split_last and (self.training or h.dtype == torch.float16):
            raise ValueError("Stack.run(split_last=True): inference only, and not in fp16 (its clamp of the sum)")
        moes = self.moes
        pending: dict[int, Routing] = {}
        routings: list[Routing] = []
        h = self.dropout(h)
        m = 0
        delta = None  # the last block's output, added to h by the next norm's add_norm
        for i, blk in enumerate(self.blocks):
            h, x = add_norm(h, delta, blk.self_norm)
            att = blk.self_attn
            q, k, v, kv = att.qkv(x)
            if cache is not None:
                ks, vs, pos, kv_all = cache
                if (kv is not None and kv_all is not None and kv_all.dtype == kv.dtype
                        and os.environ.get("PGMOE_KV_ONE_WRITE", "1") != "0"):  # (bench variant #kvwrites: two)
                    kv_all[:, i].index_copy_(3, pos, kv)  # both caches in one launch (ks[i], vs[i] are its views)
                else:
                    ks[i].index_copy_(2, pos, k.to(ks[i].dtype))
                    vs[i].index_copy_(2, pos, v.to(vs[i].dtype))
                k, v = ks[i], vs[i]
                if i == len(self.blocks) - 1:
                    pos += 1  # every block has written at pos: the next step's, off the step's tail
            delta = blk.dropout(att.attend(q, k, v, self_bias))
            if self.decoder:
                h, x = add_norm(h, delta, blk.cross_norm)
                ck, cv = cross_kv[i]
                ca = blk.cross_attn
                delta = blk.dropout(ca.attend(ca.heads(ca.q, x), ck, cv, cross_bias))
            h, x = add_norm(h, delta, blk.ff_norm)
            if blk.sparse:
                mlp: SparseMLP = blk.ff
                supplied = pending.pop(m, None)
                if supplied is None and not mlp.uses_own_router:
                    raise RuntimeError(f"MoE block {m} is pre-gated but no earlier pre-gate routed it")
                probe = self.probe_agreement and supplied is not None
                own, pre = mlp.gates(x, need_own=supplied is None or probe, need_logits=need_logits)
                routing = supplied if supplied is not None else own
                if probe:
                    self.agreement[m] = (own.ids == supplied.ids).float().mean()
                if pre is not None:
                    target = m + self.lookahead
                    pending[target] = pre
                    if moes[target].expert_source is not None:
                        moes[target].expert_source.prefetch(pre)
                y = mlp.experts(x, routing)
                routings.append(routing)
                m += 1
            else:
                y = blk.ff(x)
            if split_last and i == len(self.blocks) - 1:
                return (h, y), routings
            delta = blk.dropout(y)
        _, out = add_norm(h, delta, self.final_norm)
        return self.dropout(out), routings


@dataclass
class SwitchOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    encoder_routings: list[Routing] = field(default_factory=list)
    decoder_routings: list[Routing] = field(default_factory=list)


def mask_bias(mask_BK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1/0 key mask [B, K] -> additive [B, 1, 1, K]."""
    return (1.0 - mask_BK[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def router_z_loss(logits_BNE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_BNE, dim=-1).pow(2).mean()


def load_balancing_loss(logits_BNE: torch.Tensor) -> torch.Tensor:
    """Switch's auxiliary loss, E^2 * mean over (group, expert) of token fraction x mean probability."""
    E = logits_BNE.shape[-1]
    probs = torch.softmax(logits_BNE, dim=-1)
    frac = F.one_hot(logits_BNE.argmax(-1), E).float().mean(dim=-2)
    return (frac * probs.mean(dim=-2)).mean() * E**2


def router_losses(routings: list[Routing], batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """z-loss and load-balancing loss over a stack's MoE blocks, the blocks' tokens joined along the
    sequence as transformers does. None if any routing carries no logits."""
    if not routings or any(r.logits is None for r in routings):
        return None
    logits = torch.cat([r.logits.view(batch, -1, r.logits.shape[-1]) for r in routings], dim=1)
    return router_z_loss(logits), load_balancing_loss(logits)


class Switch(nn.Module):
    def __init__(self, cfg: SwitchConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    # -- parameters --------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """transformers' initialisation for Switch (normal, fan-in scaled)."""
        c, f = self.cfg, self.cfg.initializer_factor

        def normal(t, std):
            t.normal_(0.0, std, generator=generator)

        normal(self.shared.weight, f * 1.0)
        if self.lm_head is not None:
            normal(self.lm_head.weight, f * 1.0)
        for mod in self.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.fill_(f)
            elif isinstance(mod, Attention):
                normal(mod.q.weight, f * (c.d_model * c.d_kv) ** -0.5)
                normal(mod.k.weight, f * c.d_model**-0.5)
                normal(mod.v.weight, f * c.d_model**-0.5)
                normal(mod.o.weight, f * (c.num_heads * c.d_kv) ** -0.5)
                if mod.relative_attention_bias is not None:
                    normal(mod.relative_attention_bias.weight, f * c.d_model**-0.5)
            elif isinstance(mod, DenseFF):
                normal(mod.wi.weight, f * c.d_model**-0.5)
                normal(mod.wo.weight, f * c.d_ff**-0.5)
            elif isinstance(mod, SparseMLP):
                normal(mod.router.weight, f * 1.0)
                if mod.router.bias is not None:
                    mod.router.bias.zero_()
                normal(mod.w_in, f * c.d_model**-0.5)
                normal(mod.w_out, f * c.d_model**-0.5)
                if mod.pregate is not None:
                    normal(mod.pregate.weight, f * 1.0)

    @property
    def moes(self) -> list[SparseMLP]:
        return self.encoder.moes + self.decoder.moes

    def set_backend(self, backend: str) -> Switch:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
        for moe in self.moes:
            moe.backend = backend
        for stack in (self.encoder, self.decoder):
            for blk in stack.blocks:
                for att in (blk.self_attn, getattr(blk, "cross_attn", None)):
                    if att is not None:
                        att.decode_kernel = backend == "triton"
        return self

    def fuse_for_inference(self) -> Switch:
        """Fuse each self-attention's q/k/v weights (views of one matrix; no extra memory); the
        inference runner calls it once after loading. Idempotent. Not for models wrapped by FSDP,
        whose parameters are sharded DTensors."""
        for stack in (self.encoder, self.decoder):
            for blk in stack.blocks:
                blk.self_attn.fuse_qkv()
        return self

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(h * self.cfg.d_model**-0.5, self.shared.weight)
        return self.lm_head(h)

    def head(self) -> tuple[torch.Tensor, float]:
        """The LM head as (weight [V, D], scale): logits = (h * scale) @ weight.T, as _logits computes them."""
        if self.lm_head is None:
            return self.shared.weight, self.cfg.d_model**-0.5
        return self.lm_head.weight, 1.0

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        out = labels.new_zeros(labels.shape)
        out[..., 1:] = labels[..., :-1]
        out[..., 0] = self.cfg.decoder_start_token_id
        return out.masked_fill(out == -100, self.cfg.pad_token_id)

    # -- full-sequence passes (training, scoring) ---------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, need_logits: bool = False):
        B, S = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.shared(input_ids)
        pos = torch.arange(S, device=h.device)
        att0 = self.encoder.blocks[0].self_attn
        bias = att0.position_bias(pos, S).to(h.dtype) + mask_bias(attention_mask, h.dtype)
        return self.encoder.run(h, bias, need_logits=need_logits)

    def _cross_kv(self, enc_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (b.cross_attn.heads(b.cross_attn.k, enc_out), b.cross_attn.heads(b.cross_attn.v, enc_out))
            for b in self.decoder.blocks
        ]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> SwitchOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        need_logits = labels is not None or self.training
        enc_out, enc_r = self.encode(input_ids, attention_mask, need_logits=need_logits)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        B, T = decoder_input_ids.shape
        h = self.shared(decoder_input_ids)
        pos = torch.arange(T, device=h.device)
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        keep = causal[None, None] if decoder_attention_mask is None else (
            causal[None, None] & decoder_attention_mask.bool()[:, None, None, :]
        )
        self_bias = self.decoder.blocks[0].self_attn.position_bias(pos, T).to(h.dtype)
        self_bias = self_bias + (~keep).to(h.dtype) * torch.finfo(h.dtype).min
        dec_out, dec_r = self.decoder.run(
            h, self_bias, cross_kv=self._cross_kv(enc_out), cross_bias=mask_bias(attention_mask, h.dtype),
            need_logits=need_logits,
        )
        logits = self._logits(dec_out)
        out = SwitchOutput(logits=logits, encoder_routings=enc_r, decoder_routings=dec_r)
        if labels is not None:
            out.lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
            z = logits.new_zeros((), dtype=torch.float32)
            aux = logits.new_zeros((), dtype=torch.float32)
            for rs in (enc_r, dec_r):
                losses = router_losses(rs, B)
                if losses is not None:
                    z, aux = z + losses[0], aux + losses[1]
            out.z_loss, out.aux_loss = z, aux
            out.loss = out.lm_loss + self.cfg.router_z_loss_coef * z + self.cfg.router_aux_loss_coef * aux
        return out

    # -- incremental decoding ------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_len: int = 64
    ) -> DecodeState:
        """Encode the prompts and allocate the decoder's caches for `max_len` decoder positions."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        enc_out, routings = self.encode(input_ids, attention_mask)
        c, B = self.cfg, input_ids.shape[0]
        kv = self._cross_kv(enc_out)
        # The decoder's self-attention bias for every query position, computed once: a step then
        # reads its row with one index instead of recomputing the buckets (a dozen launches).
        qpos = torch.arange(max_len, device=enc_out.device)
        table = self.decoder.blocks[0].self_attn.position_bias(qpos, max_len)[0].to(enc_out.dtype)  # [H, Tq, Tk]
        future = qpos[None, :] > qpos[:, None]
        table = (table + future.to(enc_out.dtype) * torch.finfo(enc_out.dtype).min).transpose(0, 1).contiguous()
        shape = (B, c.num_heads, max_len, c.d_kv)
        n = len(self.decoder.blocks)
        # every block's self-attention keys and values in one buffer (views per block), so a beam-search reorder
        # is one gather instead of 4 x blocks launches
        self_kv = torch.zeros((2, n) + shape, dtype=enc_out.dtype, device=enc_out.device)
        return DecodeState(
            enc_bias=mask_bias(attention_mask, enc_out.dtype),
            cross_k=[k.contiguous() for k, _ in kv],
            cross_v=[v.contiguous() for _, v in kv],
            self_k=list(self_kv[0].unbind(0)),
            self_v=list(self_kv[1].unbind(0)),
            self_kv=self_kv,
            pos=torch.zeros(1, dtype=torch.long, device=enc_out.device),
            max_len=max_len,
            enc_out=enc_out,
            routings=routings,
            self_bias=table,
        )

    @torch.no_grad()
    def decode_one_token(self, state: DecodeState, tokens_B: torch.Tensor) -> torch.Tensor:
        """One decoder step for tokens [B] at position state.pos; returns fp32 logits [B, V] and
        advances state.pos in place. No host synchronisation: capturable as a CUDA graph."""
        return self._logits(self.decode_hidden(state, tokens_B)[:, None])[:, 0].float()

    @torch.no_grad()
    def decode_hidden(self, state: DecodeState, tokens_B: torch.Tensor, split_last: bool = False):
        """decode_one_token up to the LM head: the decoder's final hidden state [B, D] (model dtype), which
        head() turns into the logits (models.generate.GreedySelect.from_hidden: in one kernel with the choice).
        split_last: (residual [B, D], last block's output [B, D]) instead, whose sum final_norm() takes (Stack.run)."""
        moes = self.decoder.moes
        src = moes[0].expert_source if moes else None
        start = getattr(src, "step_start", None)
        if start is not None:  # the offload runner's guess of the first MoE block's experts (ExpertSource)
            start(tokens_B)
        # beam search's reorder of the self caches, chosen at the end of the last step, runs here: behind the guess's
        # copies (started above), not before them, so the link is not idle while it runs
        state.apply_deferred()
        h = self.shared(tokens_B[:, None])
        bias = state.self_bias.index_select(0, state.pos).unsqueeze(2)  # [1, H, 1, Tmax]
        kv = list(zip(state.cross_k, state.cross_v))
        out, _ = self.decoder.run(
            h, bias, cross_kv=kv, cross_bias=state.enc_bias,
            cache=(state.self_k, state.self_v, state.pos, state.self_kv),
            split_last=split_last,
        )  # (advances state.pos)
        if split_last:
            return out[0][:, 0], out[1][:, 0]
        return out[:, 0]
