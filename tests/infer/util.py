"""Tiny random checkpoints for the runner's tests."""

from __future__ import annotations

import torch

from models.checkpoint import save_switch
from models.config import preset
from models.pregate import convert_to_pregated
from models.switch import Switch


def tiny_checkpoint(path, *, pregated: bool = True, lookahead: int = 1, seed: int = 0, **overrides):
    cfg = preset("tiny", **overrides)
    torch.manual_seed(seed)
    model = Switch(cfg)
    g = torch.Generator().manual_seed(seed)
    model.init_weights(g)
    # sharper routers so that tokens spread over several experts and the caches see misses and hits
    with torch.no_grad():
        for moe in model.moes:
            moe.router.weight.mul_(3.0)
        model.shared.weight[:3].mul_(0.1)  # pad/eos/unk rarely win: the tokens vary and no run stops early
    if pregated:
        convert_to_pregated(model, lookahead)
    model.eval()
    save_switch(model, path)
    return path


def prompts(n: int = 3, length: int = 11, vocab: int = 384, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    if n > 1:
        mask[1, length - 4 :] = 0
        ids[1, length - 4 :] = 0
    return ids, mask
