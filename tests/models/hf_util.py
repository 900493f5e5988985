"""Random tiny Switch checkpoints written by transformers itself (no download)."""

from __future__ import annotations

import pytest
import torch


def hf_switch(tmp_path, *, capacity=1000, seed=0, num_experts=5, **over):
    transformers = pytest.importorskip("transformers")
    from packaging.version import Version

    v = Version(transformers.__version__)
    if Version("5.0") <= v < Version("5.18"):
        pytest.skip(f"transformers {v} has a broken Switch router; parity needs >= 5.18 or 4.57.x")
    cfg = dict(
        vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=4, num_decoder_layers=4,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_heads=4, num_experts=num_experts,
        expert_capacity=capacity, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        dropout_rate=0.1, router_jitter_noise=0.01, decoder_start_token_id=0,
    )
    cfg.update(over)
    torch.manual_seed(seed)
    hf = transformers.SwitchTransformersForConditionalGeneration(transformers.SwitchTransformersConfig(**cfg))
    # Larger router weights make routing decisions far from ties, so fp32 rounding cannot flip them.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "router" in name:
                p.mul_(3.0)
    hf.eval()
    path = tmp_path / f"hf-switch-{seed}-{capacity}"
    hf.save_pretrained(path)
    return hf, path
