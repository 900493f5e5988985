"""Contract 1: the own model reproduces transformers' Switch model."""

import pytest
import torch

from models.checkpoint import load_switch, save_switch
from models.generate import beam_search, greedy
from tests.models.hf_util import hf_switch

LOGIT_ATOL = 1e-4
LOSS_ATOL = 1e-5


def _batch(seed=1, B=3, S=12, T=7, vocab=99):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 9:] = 0  # a padded prompt
    labels = torch.randint(2, vocab, (B, T), generator=g)
    labels[2, 5:] = -100
    return x, mask, labels


@pytest.mark.parametrize("capacity", [1000, 2], ids=["capacity-off", "capacity-drops"])
def test_logits_and_loss_match_transformers(tmp_path, capacity):
    hf, path = hf_switch(tmp_path, capacity=capacity)
    own = load_switch(path)
    x, mask, labels = _batch()
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, labels=labels, output_router_logits=True)
        out = own(x, attention_mask=mask, labels=labels)
    assert (out.logits - ref.logits).abs().max().item() <= LOGIT_ATOL
    z_ref = ref.encoder_z_loss + ref.decoder_z_loss
    aux_ref = ref.encoder_aux_loss + ref.decoder_aux_loss
    assert abs(out.z_loss.item() - z_ref.item()) <= LOSS_ATOL * max(1.0, abs(z_ref.item()))
    assert abs(out.aux_loss.item() - aux_ref.item()) <= LOSS_ATOL
    assert abs(out.loss.item() - ref.loss.item()) <= LOSS_ATOL
    if capacity == 2:  # the capacity case must really drop tokens
        ids = out.encoder_routings[0].ids.view(3, 12)
        assert (torch.bincount(ids[0].long(), minlength=5) > 2).any()


def test_dropless_equals_unbounded_capacity(tmp_path):
    hf, path = hf_switch(tmp_path, capacity=1000)
    own = load_switch(path)
    dropless = load_switch(path)
    for moe in dropless.moes:
        moe.capacity = None
    x, mask, labels = _batch(seed=3)
    with torch.no_grad():
        a = own(x, attention_mask=mask, labels=labels).logits
        b = dropless(x, attention_mask=mask, labels=labels).logits
    assert torch.equal(a, b)


def test_greedy_generation_matches_transformers(tmp_path):
    hf, path = hf_switch(tmp_path, capacity=1000, seed=4)
    own = load_switch(path)
    x, mask, _ = _batch(seed=5)
    ref = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=1)
    got = greedy(own, x, mask, max_new_tokens=10)
    n = min(got.shape[1], ref.shape[1] - 1)
    assert torch.equal(got[:, :n], ref[:, 1 : 1 + n])
    assert got.shape[1] == ref.shape[1] - 1


def test_beam_search_matches_transformers(tmp_path):
    hf, path = hf_switch(tmp_path, capacity=1000, seed=6)
    own = load_switch(path)
    x, mask, _ = _batch(seed=7)
    ref = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=4,
                      early_stopping=False, length_penalty=1.0)
    got = beam_search(own, x, mask, max_new_tokens=8, num_beams=4)
    assert torch.equal(got, ref[:, 1:1 + got.shape[1]])


def test_round_trip_own_save_transformers_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf, path = hf_switch(tmp_path, capacity=3, seed=8)
    own = load_switch(path)
    out_dir = save_switch(own, tmp_path / "own-save")
    cls = transformers.SwitchTransformersForConditionalGeneration
    hf1, hf2 = cls.from_pretrained(path).eval(), cls.from_pretrained(out_dir).eval()
    x, mask, labels = _batch(seed=9)
    with torch.no_grad():
        a = hf1(input_ids=x, attention_mask=mask, labels=labels).logits
        b = hf2(input_ids=x, attention_mask=mask, labels=labels).logits
    assert torch.equal(a, b)


def test_sharded_save_loads(tmp_path):
    hf, path = hf_switch(tmp_path, capacity=1000, seed=10)
    own = load_switch(path)
    sharded = save_switch(own, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (sharded / "model.safetensors.index.json").exists()
    again = load_switch(sharded)
    x, mask, labels = _batch(seed=11)
    with torch.no_grad():
        assert torch.equal(own(x, mask, labels=labels).logits, again(x, mask, labels=labels).logits)


def test_pytorch_bin_checkpoint_loads(tmp_path):
    hf, path = hf_switch(tmp_path, capacity=1000, seed=12)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    torch.save({k: v.clone() for k, v in hf.state_dict().items()}, bin_dir / "pytorch_model.bin")
    own = load_switch(bin_dir)
    x, mask, labels = _batch(seed=13)
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, labels=labels).logits
        assert (own(x, mask, labels=labels).logits - ref).abs().max() <= LOGIT_ATOL
