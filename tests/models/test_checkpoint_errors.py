"""Bad checkpoints fail loudly, naming the key or file and what was expected."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError, load_switch, save_switch
from models.config import preset
from models.switch import Switch

EXPERT_KEY = "encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight"


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    return save_switch(Switch(preset("tiny")), tmp_path / "ckpt")


def _rewrite(path, fn):
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_key_is_named(ckpt):
    _rewrite(ckpt, lambda sd: sd.pop(EXPERT_KEY))
    with pytest.raises(CheckpointError, match="missing keys.*expert_3.wi.weight"):
        load_switch(ckpt)


def test_unexpected_key_is_named(ckpt):
    _rewrite(ckpt, lambda sd: sd.__setitem__("encoder.block.1.layer.1.mlp.experts.expert_8.wi.weight",
                                             torch.randn(128, 64)))
    with pytest.raises(CheckpointError, match="unexpected keys.*expert_8"):
        load_switch(ckpt)


def test_shape_mismatch_names_key_and_shapes(ckpt):
    _rewrite(ckpt, lambda sd: sd.__setitem__(EXPERT_KEY, torch.randn(100, 64)))
    with pytest.raises(CheckpointError, match=r"expert_3.wi.weight.*\[100, 64\].*\[128, 64\]"):
        load_switch(ckpt)


def test_config_of_another_model_is_refused(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "t5"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type is 't5', expected 'switch_transformers'"):
        load_switch(ckpt)


def test_missing_config_is_named(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_switch(ckpt)


def test_truncated_file_is_named(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_switch(ckpt)


def test_missing_shard_is_named(tmp_path):
    torch.manual_seed(1)
    path = save_switch(Switch(preset("tiny")), tmp_path / "sharded", max_shard_bytes=200_000)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name}"):
        load_switch(path)


def test_no_weights_is_named(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_switch(ckpt)


def test_loading_casts_dtype_and_streams_to_meta_when_skipped(ckpt):
    m = load_switch(ckpt, dtype=torch.bfloat16, skip=lambda name: name.endswith(("w_in", "w_out")))
    assert m.shared.weight.dtype == torch.bfloat16
    assert m.moes[0].w_in.is_meta and not m.moes[0].router.weight.is_meta
