"""The model architecture we serve, read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qserve.errors import ConfigError

# Llama, Mistral and Qwen2 share one decoder shape (RMSNorm, RoPE, GQA, SwiGLU); Qwen2 adds
# biases on q/k/v.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    quantization_config: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def quant_method(self) -> str | None:
        qc = self.quantization_config
        return qc.get("quant_method") if qc else None

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    archs = raw.get("architectures") or []
    if not archs:
        raise ConfigError("config.json has no 'architectures' entry; cannot tell what model this is")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"unsupported architecture {arch!r}; qserve serves {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        rope_params = raw.get("rope_parameters") or {}
        rope_scaling = raw.get("rope_scaling")
        if rope_params and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        cfg = ModelConfig(
            architecture=SUPPORTED_ARCHITECTURES[arch],
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", arch == "Qwen2ForCausalLM")),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_eos_ids(raw.get("eos_token_id")),
            quantization_config=raw.get("quantization_config"),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"config.json is missing or has a bad value for {e}") from e
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) != "llama3":
        raise ConfigError(f"unsupported rope_scaling {cfg.rope_scaling}")
    return cfg


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir} has no config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    return parse_config(raw)
