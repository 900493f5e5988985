"""int8 checkpoint storage (save_switch(quantize="int8")): the format the shipped default model uses."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import SCALE_SUFFIX, CheckpointError, load_switch, save_switch
from models.config import preset
from models.pregate import convert_to_pregated
from models.switch import Switch


def _model():
    torch.manual_seed(0)
    m = Switch(preset("tiny", d_model=96, d_ff=160))
    convert_to_pregated(m, 1)
    return m.eval()


def test_int8_round_trip_within_half_a_step(tmp_path):
    m = _model()
    save_switch(m, tmp_path / "q", quantize="int8")
    save_switch(m, tmp_path / "f")
    qsize = (tmp_path / "q" / "model.safetensors").stat().st_size
    fsize = (tmp_path / "f" / "model.safetensors").stat().st_size
    assert qsize < 0.35 * fsize, (qsize, fsize)
    raw = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert any(v.dtype == torch.int8 for v in raw.values())
    # routers and pre-gates stay full precision
    assert all(v.dtype == torch.float32 for k, v in raw.items() if "router" in k or "pregate" in k)

    q = load_switch(tmp_path / "q")
    ref = dict(m.named_parameters())
    n_quant = 0
    for name, p in q.named_parameters():
        r = ref[name].detach()
        assert p.dtype == torch.float32
        if p.dim() >= 2 and p.shape[-1] >= 64 and "router" not in name and "pregate" not in name \
                and "relative_attention_bias" not in name:
            step = r.abs().amax(dim=-1, keepdim=True) / 127  # per row
            assert ((p - r).abs() <= step / 2 + 1e-7).all(), name
            assert not torch.equal(p, r)
            n_quant += 1
        else:
            torch.testing.assert_close(p, r, rtol=0, atol=0, msg=name)
    assert n_quant > 10
    # the model still computes nearly the same thing: logits close relative to their scale
    x = torch.randint(2, 384, (2, 24))
    y = torch.randint(2, 384, (2, 7))
    with torch.no_grad():
        lq = q(x, decoder_input_ids=y).logits
        lf = m(x, decoder_input_ids=y).logits
    assert (lq - lf).abs().max() < 0.1 * lf.abs().max()


def test_offload_store_reads_int8_checkpoint(tmp_path):
    from infer.offload import ExpertStore, is_expert_param

    m = _model()
    save_switch(m, tmp_path / "q", quantize="int8")
    full = load_switch(tmp_path / "q")
    meta = load_switch(tmp_path / "q", skip=is_expert_param)
    store = ExpertStore.from_checkpoint(tmp_path / "q", meta, torch.float32, None, pin=False)
    for i, moe in enumerate(full.moes):
        for e in range(moe.w_in.shape[0]):
            torch.testing.assert_close(store.w_in(i, e), moe.w_in[e].detach(), rtol=0, atol=0)
            torch.testing.assert_close(store.w_out(i, e), moe.w_out[e].detach(), rtol=0, atol=0)


def test_int8_without_scale_is_an_error(tmp_path):
    m = _model()
    save_switch(m, tmp_path / "q", quantize="int8")
    f = tmp_path / "q" / "model.safetensors"
    raw = load_file(str(f))
    victim = next(k for k in raw if k.endswith(SCALE_SUFFIX))
    del raw[victim]
    save_file(raw, str(f))
    with pytest.raises(CheckpointError, match="without its scale"):
        load_switch(tmp_path / "q")


def test_unknown_quantize_rejected(tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        save_switch(_model(), tmp_path / "x", quantize="int4")
