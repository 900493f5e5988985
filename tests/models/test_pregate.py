"""Pre-gated conversion: the pre-gate of block i routes block i+lookahead."""

import pytest
import torch

from models.checkpoint import load_switch, save_switch
from models.config import ConfigError, preset
from models.moe import gate_logits
from models.pregate import convert_to_pregated
from models.switch import Switch


def _model(seed=0, **over):
    torch.manual_seed(seed)
    cfg = preset("tiny", num_layers=8, num_decoder_layers=8, num_sparse_encoder_layers=4,
                 num_sparse_decoder_layers=4, num_experts=7, **over)
    return Switch(cfg).eval()


def _ffn_inputs(model):
    """Record the FFN input (after the layer norm) of every sparse block, per stack."""
    seen = {"encoder": [], "decoder": []}
    hooks = []
    for name in seen:
        for blk in getattr(model, name).blocks:
            if blk.sparse:
                hooks.append(blk.ff_norm.register_forward_hook(lambda m, i, o, n=name: seen[n].append(o)))
    return seen, hooks


def _batch(B=2, S=9, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 384, (B, S), generator=g), torch.randint(3, 384, (B, T), generator=g)


def test_pregate_routes_next_block_with_its_original_router():
    model = _model()
    originals = [m.router.weight.detach().clone() for m in model.moes]
    convert_to_pregated(model, lookahead=1)
    seen, hooks = _ffn_inputs(model)
    x, y = _batch()
    with torch.no_grad():
        out = model(x, labels=y)
    for h in hooks:
        h.remove()
    n_enc = len(model.encoder.moes)
    for name, routings, offset in (("encoder", out.encoder_routings, 0), ("decoder", out.decoder_routings, n_enc)):
        inputs = seen[name]
        assert len(routings) == len(inputs) == 4
        for i in range(len(inputs) - 1):
            w = originals[offset + i + 1]
            expected = gate_logits(inputs[i].reshape(-1, inputs[i].shape[-1]), _linear(w)).argmax(-1)
            assert torch.equal(routings[i + 1].ids[:, 0].long(), expected), (name, i)
        # the first block keeps its own gate
        first = gate_logits(inputs[0].reshape(-1, inputs[0].shape[-1]), _linear(originals[offset])).argmax(-1)
        assert torch.equal(routings[0].ids[:, 0].long(), first)


def _linear(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_pregated_checkpoint_saves_and_reloads_exactly(tmp_path):
    model = convert_to_pregated(_model(seed=2), lookahead=1)
    with torch.no_grad():
        for m in model.moes:
            if m.pregate is not None:
                m.pregate.weight.add_(torch.randn_like(m.pregate.weight))  # differ from the routers
    path = save_switch(model, tmp_path / "pg")
    again = load_switch(path)
    assert again.cfg.pregated and again.cfg.lookahead == 1
    x, y = _batch(seed=3)
    with torch.no_grad():
        a, b = model(x, labels=y), again(x, labels=y)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("lookahead", [2, 3])
def test_deeper_lookahead_converts_and_runs(lookahead):
    model = convert_to_pregated(_model(seed=4), lookahead=lookahead)
    for stack in (model.encoder, model.decoder):
        moes = stack.moes
        assert [m.pregate is not None for m in moes] == [i + lookahead < 4 for i in range(4)]
        assert [m.uses_own_router for m in moes] == [i < lookahead for i in range(4)]
    x, y = _batch(seed=5)
    out = model(x, labels=y)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.moes[0].pregate.weight.grad is not None
    assert model.moes[-1].router.weight.grad is None  # pre-gated blocks' own routers are unused


def test_lookahead_too_deep_is_refused():
    with pytest.raises(ConfigError, match="lookahead=4"):
        convert_to_pregated(_model(), lookahead=4)


def test_converting_twice_is_refused():
    model = convert_to_pregated(_model(), lookahead=1)
    with pytest.raises(ConfigError, match="already pre-gated"):
        convert_to_pregated(model, lookahead=1)


def test_pregated_generation_equals_full_forward():
    """The cached decode step of a pre-gated model gives the teacher-forced logits."""
    from models.generate import greedy

    model = convert_to_pregated(_model(seed=6), lookahead=2)
    x, _ = _batch(seed=7)
    toks = greedy(model, x, max_new_tokens=5, eos_token_id=-1)
    dec_in = torch.cat([torch.zeros(2, 1, dtype=torch.long), toks[:, :-1]], dim=1)
    with torch.no_grad():
        full = model(x, decoder_input_ids=dec_in).logits
    assert torch.equal(full.argmax(-1), toks)
