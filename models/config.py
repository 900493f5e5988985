"""Model configuration: one dataclass, the named sizes, and the Hugging Face config.json mapping.

Field names follow transformers' SwitchTransformersConfig so that a config.json reads straight in.
Pre-gating adds two fields (`pregated`, `lookahead`); they are written to config.json as extra
keys, which transformers ignores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Hugging Face activation name -> name used by kernels.expert_ffn (exact-erf GELU, as ACT2FN["gelu"]).
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "silu"}


class ConfigError(ValueError):
    """A configuration that cannot describe a Switch model."""


@dataclass
class SwitchConfig:
    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    num_decoder_layers: int = 12
    num_sparse_encoder_layers: int = 6
    num_sparse_decoder_layers: int = 6
    num_experts: int = 8
    # Tokens per expert per sequence; 0 or None: dropless (no token is ever dropped).
    expert_capacity: int | None = 64
    router_bias: bool = False
    router_jitter_noise: float = 0.01
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    router_z_loss_coef: float = 0.001
    router_aux_loss_coef: float = 0.001
    initializer_factor: float = 1.0
    dense_act_fn: str = "relu"
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # Pre-gating (absent from plain Switch checkpoints).
    pregated: bool = False
    lookahead: int = 1
    # Free-form record of where the model came from (tokenizer kind, recipe); saved, never read.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- derived -----------------------------------------------------------------------------
    @property
    def encoder_sparse_step(self) -> int:
        return _sparse_step(self.num_layers, self.num_sparse_encoder_layers)

    @property
    def decoder_sparse_step(self) -> int:
        return _sparse_step(self.num_decoder_layers, self.num_sparse_decoder_layers)

    def sparse_layers(self, decoder: bool) -> list[int]:
        """Indices of the blocks with a sparse MoE FFN (transformers' rule: i % step == 1)."""
        n = self.num_decoder_layers if decoder else self.num_layers
        step = self.decoder_sparse_step if decoder else self.encoder_sparse_step
        return [i for i in range(n) if _is_sparse(i, step)]

    @property
    def capacity(self) -> int | None:
        return self.expert_capacity if self.expert_capacity else None

    def expert_bytes(self, bytes_per_param: int = 2) -> int:
        """Bytes of one expert's weights (w_in and w_out)."""
        return 2 * self.d_model * self.d_ff * bytes_per_param

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_experts"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"SwitchConfig.{name} must be a positive integer, got {v!r}")
        if self.num_decoder_layers is None or self.num_decoder_layers <= 0:
            raise ConfigError(f"SwitchConfig.num_decoder_layers must be positive, got {self.num_decoder_layers!r}")
        if self.dense_act_fn not in ACTIVATIONS:
            raise ConfigError(
                f"SwitchConfig.dense_act_fn={self.dense_act_fn!r} is not supported; use one of {sorted(ACTIVATIONS)}"
            )
        if self.lookahead < 1:
            raise ConfigError(f"SwitchConfig.lookahead must be >= 1, got {self.lookahead}")
        if self.expert_capacity is not None and self.expert_capacity < 0:
            raise ConfigError(f"SwitchConfig.expert_capacity must be >= 0 or None, got {self.expert_capacity}")

    # -- Hugging Face config.json ------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["expert_capacity"] = self.expert_capacity or 0
        d.update(
            model_type="switch_transformers",
            architectures=["SwitchTransformersForConditionalGeneration"],
            is_encoder_decoder=True,
            encoder_sparse_step=self.encoder_sparse_step,
            decoder_sparse_step=self.decoder_sparse_step,
            router_dtype="float32",
            router_ignore_padding_tokens=False,
            use_cache=True,
        )
        if not self.extra:
            d.pop("extra")
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> SwitchConfig:
        model_type = d.get("model_type")
        if model_type != "switch_transformers":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, expected 'switch_transformers' "
                "(this loader reads Switch Transformers checkpoints only)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("num_decoder_layers") is None:
            kwargs["num_decoder_layers"] = d.get("num_layers", cls.num_layers)
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        if kwargs.get("decoder_start_token_id") is None:
            kwargs["decoder_start_token_id"] = d.get("pad_token_id", 0)
        if d.get("router_dtype", "float32") != "float32":
            raise ConfigError(f"{source}: router_dtype={d['router_dtype']!r}; only float32 routers are supported")
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - defensive
            raise ConfigError(f"{source}: {e}") from e

    @classmethod
    def from_json(cls, path: str | Path) -> SwitchConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(d, source=str(path))

    def replace(self, **changes: Any) -> SwitchConfig:
        return dataclasses.replace(self, **changes)


def _sparse_step(n_layers: int, n_sparse: int) -> int:
    return n_layers // n_sparse if n_sparse > 0 else 0


def _is_sparse(i: int, step: int) -> bool:
    if step <= 0:
        return False
    return step == 1 or i % step == 1


def _switch_base(num_experts: int) -> SwitchConfig:
    return SwitchConfig(num_experts=num_experts)


# Named sizes. The published google/switch-* configs; `tiny` is for tests and CPU demos, `small`
# and `medium` are the byte-level models this project trains itself.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=4, num_decoder_layers=4,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=8, expert_capacity=None,
        dropout_rate=0.0,
    ),
    "small": dict(  # 19.0M parameters (19 MB as int8: shippable); 4+4 MoE blocks so lookahead 1-3 all leave pre-gates
        vocab_size=384, d_model=256, d_kv=32, d_ff=384, num_heads=6, num_layers=8, num_decoder_layers=8,
        num_sparse_encoder_layers=4, num_sparse_decoder_layers=4, num_experts=8, expert_capacity=None,
        dropout_rate=0.0,
    ),
    "medium": dict(  # 170.1M parameters, 32 experts
        vocab_size=384, d_model=384, d_kv=64, d_ff=768, num_heads=6, num_layers=8, num_decoder_layers=8,
        num_sparse_encoder_layers=4, num_sparse_decoder_layers=4, num_experts=32, expert_capacity=None,
        dropout_rate=0.0,
    ),
    **{
        f"switch-base-{e}": dict(num_experts=e)
        for e in (8, 16, 32, 64, 128, 256)
    },
    "switch-large-128": dict(
        d_model=1024, d_kv=64, d_ff=4096, num_heads=16, num_layers=24, num_decoder_layers=24,
        num_sparse_encoder_layers=12, num_sparse_decoder_layers=12, num_experts=128,
    ),
}


def preset(name: str, **overrides: Any) -> SwitchConfig:
    """A named configuration, optionally with fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return SwitchConfig(**{**PRESETS[name], **overrides})


# -- Hydra -----------------------------------------------------------------------------------
# The `model` config group (conf/model/*.yaml) is checked against this structured config: every
# SwitchConfig field plus `name` (the preset the yaml was written from), so a misspelt or
# mistyped key fails when the app starts, naming the key.
ModelConf = dataclasses.make_dataclass(
    "ModelConf",
    [("name", str, field(default="tiny"))]
    + [
        (f.name, f.type, field(default=f.default))
        for f in dataclasses.fields(SwitchConfig)
        if f.name != "extra"
    ],
)


def config_from_conf(conf: Any) -> SwitchConfig:
    """A SwitchConfig from the app's `model` node (an OmegaConf node or a dict)."""
    try:
        from omegaconf import OmegaConf

        d = OmegaConf.to_container(conf, resolve=True) if OmegaConf.is_config(conf) else dict(conf)
    except ImportError:  # pragma: no cover
        d = dict(conf)
    d.pop("name", None)
    return SwitchConfig(**d)
