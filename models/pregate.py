"""Pre-gating: MoE block m of a stack carries a pre-gate that routes block m + lookahead.

The first `lookahead` MoE blocks of each stack (encoder and decoder are separate chains) keep
their own routers; the last `lookahead` blocks carry no pre-gate. A pre-gate takes the same input
as a normal gate (block m's FFN input) and is initialised from the router of the block it routes,
so fine-tuning starts from the original routing function applied one block early. The routers of
pre-gated blocks are kept (checkpoints stay loadable by transformers; agreement metrics use them)
but no longer route and get no gradient.
"""

from __future__ import annotations

from models.config import ConfigError
from models.switch import Stack, Switch


def convert_to_pregated(model: Switch, lookahead: int = 1, init_from_router: bool = True) -> Switch:
    """Turn a Switch model into a pre-gated one, in place. lookahead 1 is the paper's setting."""
    if lookahead < 1:
        raise ConfigError(f"lookahead must be >= 1, got {lookahead}")
    if any(m.pregate is not None for m in model.moes):
        raise ConfigError("the model is already pre-gated; convert an unconverted Switch model")
    for name in ("encoder", "decoder"):
        stack: Stack = getattr(model, name)
        moes = stack.moes
        if moes and lookahead >= len(moes):
            raise ConfigError(
                f"lookahead={lookahead} leaves no pre-gate in the {name}, which has {len(moes)} MoE blocks; "
                f"use lookahead < {len(moes)}"
            )
        for m, moe in enumerate(moes):
            if m + lookahead < len(moes):
                target = moes[m + lookahead].router
                moe.add_pregate(target)
                if not init_from_router:
                    moe.pregate.to(target.weight.device)
            if m >= lookahead:
                moe.uses_own_router = False
                moe.router.requires_grad_(False)
        stack.lookahead = lookahead
    model.cfg = model.cfg.replace(pregated=True, lookahead=lookahead)
    return model


def is_pregated(model: Switch) -> bool:
    return bool(model.cfg.pregated)
