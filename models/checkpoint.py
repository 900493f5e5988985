"""Hugging Face Switch checkpoints in and out, by key name.

A checkpoint directory holds config.json and the weights as model.safetensors, sharded
safetensors with model.safetensors.index.json, pytorch_model.bin, or sharded .bin with
pytorch_model.bin.index.json. Loading is streaming: the model is built without storage (meta
device), then each parameter is allocated once and filled one tensor at a time from memory-mapped
files, so peak RAM is the model plus one tensor. Pre-gate weights are extra keys
(`...mlp.pregate.weight`) that transformers ignores; `pregated`/`lookahead` ride in config.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.expert_ffn import quantize_experts
from models.config import ConfigError, SwitchConfig
from models.switch import Switch


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into (names the key or file)."""


# transformers may or may not write the tied copies of the embedding; both are accepted.
_TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def key_map(cfg: SwitchConfig, model: Switch) -> dict[str, tuple[str, int | None]]:
    """Hugging Face key -> (own parameter name, expert index or None)."""
    out: dict[str, tuple[str, int | None]] = {"shared.weight": ("shared.weight", None)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", None)
    for stack_name in ("encoder", "decoder"):
        stack = getattr(model, stack_name)
        ff_layer = 2 if stack.decoder else 1
        out[f"{stack_name}.final_layer_norm.weight"] = (f"{stack_name}.final_norm.weight", None)
        for i, blk in enumerate(stack.blocks):
            hf, own = f"{stack_name}.block.{i}.layer", f"{stack_name}.blocks.{i}"
            out[f"{hf}.0.layer_norm.weight"] = (f"{own}.self_norm.weight", None)
            for p in "qkvo":
                out[f"{hf}.0.SelfAttention.{p}.weight"] = (f"{own}.self_attn.{p}.weight", None)
            if blk.self_attn.relative_attention_bias is not None:
                out[f"{hf}.0.SelfAttention.relative_attention_bias.weight"] = (
                    f"{own}.self_attn.relative_attention_bias.weight", None)
            if stack.decoder:
                out[f"{hf}.1.layer_norm.weight"] = (f"{own}.cross_norm.weight", None)
                for p in "qkvo":
                    out[f"{hf}.1.EncDecAttention.{p}.weight"] = (f"{own}.cross_attn.{p}.weight", None)
            f = f"{hf}.{ff_layer}"
            out[f"{f}.layer_norm.weight"] = (f"{own}.ff_norm.weight", None)
            if blk.sparse:
                out[f"{f}.mlp.router.classifier.weight"] = (f"{own}.ff.router.weight", None)
                if cfg.router_bias:
                    out[f"{f}.mlp.router.classifier.bias"] = (f"{own}.ff.router.bias", None)
                if blk.ff.pregate is not None:
                    out[f"{f}.mlp.pregate.weight"] = (f"{own}.ff.pregate.weight", None)
                    if cfg.router_bias:
                        out[f"{f}.mlp.pregate.bias"] = (f"{own}.ff.pregate.bias", None)
                for e in range(cfg.num_experts):
                    out[f"{f}.mlp.experts.expert_{e}.wi.weight"] = (f"{own}.ff.w_in", e)
                    out[f"{f}.mlp.experts.expert_{e}.wo.weight"] = (f"{own}.ff.w_out", e)
            else:
                out[f"{f}.mlp.wi.weight"] = (f"{own}.ff.wi.weight", None)
                out[f"{f}.mlp.wo.weight"] = (f"{own}.ff.wo.weight", None)
    return out


class CheckpointReader:
    """Lazy, memory-mapped access to the tensors of a checkpoint directory by key name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        files = self._weight_files()
        for f in files:
            for k in self._keys_of(f):
                self._where[k] = f
        # int8-rowwise tensors (save_switch(quantize="int8")): `K` int8 plus `K` + SCALE_SUFFIX; the
        # scale keys are not model keys, get(K) dequantizes.
        self._scale = {k[: -len(SCALE_SUFFIX)]: (k, f) for k, f in self._where.items() if k.endswith(SCALE_SUFFIX)}
        for k, _ in self._scale.values():
            del self._where[k]
        orphan = [k for k in self._scale if k not in self._where]
        if orphan:
            raise CheckpointError(f"{self.path}: int8 scale without its tensor for {orphan[:3]}; "
                                  "the checkpoint is incomplete")

    def _weight_files(self) -> list[Path]:
        p = self.path
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (p / index).exists():
                try:
                    weight_map = json.loads((p / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{p / index}: not a valid shard index ({e})") from e
                files = sorted({p / f for f in weight_map.values()})
                for f in files:
                    if not f.exists():
                        raise CheckpointError(f"{p / index} names shard {f.name}, which is missing from {p}")
                return files
            if (p / single).exists():
                return [p / single]
        raise CheckpointError(
            f"{p}: no weights found; expected model.safetensors, model.safetensors.index.json, "
            "pytorch_model.bin or pytorch_model.bin.index.json"
        )

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                if f.suffix == ".safetensors":
                    self._open[f] = safe_open(str(f), framework="pt")
                else:
                    self._open[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # truncated or corrupt files surface here
                raise CheckpointError(f"{f}: cannot read weights ({type(e).__name__}: {e}); "
                                      "the file may be truncated or corrupt") from e
        return self._open[f]

    def _keys_of(self, f: Path) -> list[str]:
        h = self._handle(f)
        return list(h.keys())

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        f = self._where[key]
        h = self._handle(f)
        try:
            t = h.get_tensor(key) if f.suffix == ".safetensors" else h[key]
            if key in self._scale:
                scale_key, sf = self._scale[key]
                g = self._handle(sf)
                scale = g.get_tensor(scale_key) if sf.suffix == ".safetensors" else g[scale_key]
                return dequantize_int8(t, scale)
            if t.dtype == torch.int8:
                raise CheckpointError(f"{f}: tensor {key!r} is int8 without its scale {key + SCALE_SUFFIX!r}")
            return t
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor {key!r} ({type(e).__name__}: {e}); "
                                  "the file may be truncated or corrupt") from e

    @property
    def quantized(self) -> bool:
        return bool(self._scale)

    def shape(self, key: str) -> tuple[int, ...]:
        f = self._where[key]
        h = self._handle(f)
        if f.suffix == ".safetensors":
            return tuple(h.get_slice(key).get_shape())
        return tuple(h[key].shape)


SCALE_SUFFIX = ".int8_scale"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w[r, :] ~= q[r, :] * scale[r] (scale fp32, absmax / 127); the scheme the
    expert FFN kernels read (kernels.expert_ffn.quantize_experts)."""
    q, scale = quantize_experts(w)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if q.dtype != torch.int8 or scale.shape != q.shape[:1]:
        raise CheckpointError(f"int8 tensor {list(q.shape)} ({q.dtype}) does not match its scale {list(scale.shape)}")
    return q.float() * scale.float()[:, None]


def _quantizable(key: str, t: torch.Tensor) -> bool:
    """Matrices of the FFNs, attention and embeddings; routers, pre-gates, norms and the position
    bias stay in full precision (routing decisions are sensitive, and they are small)."""
    return t.dim() == 2 and t.shape[1] >= 64 and "router" not in key and "pregate" not in key \
        and "relative_attention_bias" not in key


def load_config(path: str | Path) -> SwitchConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: config.json is missing (a Hugging Face checkpoint directory needs one)")
    try:
        return SwitchConfig.from_json(cfg_file)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def _expected_shape(param: torch.Tensor, expert: int | None) -> tuple[int, ...]:
    return tuple(param.shape[1:]) if expert is not None else tuple(param.shape)


def meta_model(cfg: SwitchConfig) -> Switch:
    """The model `cfg` describes (pre-gates included when cfg.pregated), parameters on the meta device:
    the skeleton a checkpoint is loaded into, or counted."""
    from models.pregate import convert_to_pregated

    with torch.device("meta"):
        model = Switch(cfg.replace(pregated=False))
    if cfg.pregated:
        convert_to_pregated(model, cfg.lookahead, init_from_router=False)
    return model


def load_switch(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    skip: Callable[[str], bool] | None = None,
    progress: bool = False,
) -> Switch:
    """Load a Switch checkpoint directory into the own model (strict: every parameter must be found,
    every key must be known, every shape must match).

    skip(own_name) -> True leaves that parameter on the meta device (the offload runner loads
    expert weights straight into pinned memory instead)."""
    path = Path(path)
    cfg = load_config(path)
    reader = CheckpointReader(path)
    model = meta_model(cfg)
    mapping = key_map(cfg, model)

    unexpected = [k for k in reader.keys() if k not in mapping and k not in _TIED]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                              f"({len(unexpected)} in all) for a Switch model with this config.json")
    missing = [k for k in mapping if k not in reader]
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                              f"({len(missing)} in all)")

    params = dict(model.named_parameters())
    target_dtype = dtype or _checkpoint_dtype(reader, next(iter(mapping)))
    # Allocate each kept parameter once, on the target device.
    for name, p in params.items():
        if skip is not None and skip(name):
            continue
        _set_param(model, name, torch.empty(p.shape, dtype=target_dtype, device=device))
    params = dict(model.named_parameters())

    items = list(mapping.items())
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc=f"loading {path.name}", unit="tensor")
    for key, (own, expert) in items:
        p = params[own]
        want = _expected_shape(p, expert)
        got = reader.shape(key)
        if tuple(got) != want:
            raise CheckpointError(f"{path}: shape mismatch for {key!r}: checkpoint has {list(got)}, "
                                  f"the model (config.json) expects {list(want)}")
        if p.is_meta:
            continue
        with torch.no_grad():
            (p[expert] if expert is not None else p).copy_(reader.get(key))
    model.train(False)
    return model


def _checkpoint_dtype(reader: CheckpointReader, key: str) -> torch.dtype:
    return torch.float32 if reader.quantized else reader.get(key).dtype


def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    *parents, leaf = name.split(".")
    mod = model
    for part in parents:
        mod = getattr(mod, part)
    old = getattr(mod, leaf)
    setattr(mod, leaf, torch.nn.Parameter(value, requires_grad=old.requires_grad))


def hf_state_dict(model: Switch) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under Hugging Face key names (views, no copies)."""
    params = dict(model.named_parameters())
    for key, (own, expert) in key_map(model.cfg, model).items():
        t = params[own]
        yield key, (t[expert] if expert is not None else t).detach()


def save_switch(model: Switch, path: str | Path, *, max_shard_bytes: int | None = None,
                extra_files: dict[str, str] | None = None, quantize: str | None = None) -> Path:
    """Save as a Hugging Face checkpoint directory that transformers loads; written to a temporary
    directory beside `path` and renamed into place, so a crash never leaves a half-written checkpoint.

    quantize="int8": the FFN, attention and embedding matrices as symmetric per-row int8 with an fp32
    scale per row (key + ".int8_scale"), about a quarter of fp32's bytes; routers, pre-gates, norms
    and the position bias stay as they are. This project's loaders dequantize on read (to fp32);
    transformers cannot load such a directory."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r}: expected None or 'int8'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        cfg = model.cfg
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        tensors = {k: v.to("cpu").contiguous() for k, v in hf_state_dict(model)}
        if quantize == "int8":
            for k in [k for k, v in tensors.items() if _quantizable(k, v)]:
                tensors[k], tensors[k + SCALE_SUFFIX] = quantize_int8(tensors[k])
        if max_shard_bytes is None:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            shards: list[dict[str, torch.Tensor]] = [{}]
            size = 0
            for k, v in tensors.items():
                n = v.numel() * v.element_size()
                if shards[-1] and size + n > max_shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][k] = v
                size += n
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst` by renames, so `dst` is never half written."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)

