"""ModelConfig: the architecture of a Llama-family checkpoint, read from config.json or a recipe."""

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from facli.errors import FacliError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` of config.json; `rope_type` is one of SUPPORTED_ROPE_TYPES."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise FacliError(
                f"expected rope_scaling type one of {', '.join(SUPPORTED_ROPE_TYPES)}, "
                f"got {self.rope_type!r}; facli cannot run this checkpoint's position encoding"
            )
        if self.factor <= 0:
            raise FacliError(f"expected a positive rope_scaling factor, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture values, with config.json's names. Shapes follow from these alone."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (qwen2 always has them)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    sliding_window: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise FacliError(
                f"expected model_type one of {', '.join(SUPPORTED_MODEL_TYPES)}, "
                f"got {self.model_type!r}"
            )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise FacliError(f"expected {name} > 0 in config.json, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise FacliError(
                f"expected num_attention_heads ({self.num_attention_heads}) to be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, per unit of element size."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    def num_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q = self.num_attention_heads * d
        kv = self.num_key_value_heads * d
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + h

    def check_sliding_window(self, ctx: int) -> None:
        """Mistral checkpoints with a sliding window are exact only while ctx <= window."""
        if self.sliding_window is not None and ctx > self.sliding_window:
            raise FacliError(
                f"expected --ctx at most the model's sliding_window ({self.sliding_window}), got "
                f"{ctx}; facli runs full attention only, so lower --ctx"
            )

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise FacliError(
                f"expected model_type one of {', '.join(SUPPORTED_MODEL_TYPES)}, got {model_type!r}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in raw]
        if missing:
            raise FacliError(f"expected {', '.join(missing)} in config.json; the file is incomplete")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        values["num_key_value_heads"] = raw.get("num_key_value_heads") or raw["num_attention_heads"]
        values.setdefault("max_position_embeddings", 2048)
        values["rope_scaling"] = _parse_rope_scaling(raw.get("rope_scaling"), raw)
        values["rope_theta"] = float(_rope_theta(raw))
        values["attention_bias"] = bool(raw.get("attention_bias", model_type == "qwen2"))
        values["eos_token_ids"] = _as_tuple(raw.get("eos_token_id"))
        values["sliding_window"] = _sliding_window(raw)
        values.pop("eos_token_id", None)
        values["torch_dtype"] = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
        return cls(**values)

    @classmethod
    def from_dir(cls, directory: Path) -> "ModelConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FacliError(
                f"expected config.json in {directory}, found none; point --model at a Hugging Face "
                "checkpoint directory"
            )
        config = cls.from_dict(_read_json(path))
        # Chat checkpoints often end a turn with a token that only generation_config.json names
        # (Llama 3 Instruct's <|eot_id|>); transformers' generate stops at those too.
        generation = Path(directory) / "generation_config.json"
        if generation.is_file():
            extra = _as_tuple(_read_json(generation).get("eos_token_id"))
            merged = tuple(dict.fromkeys(config.eos_token_ids + extra))
            config = replace(config, eos_token_ids=merged)
        return config


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FacliError(f"expected valid JSON in {path}, got a parse error: {exc}") from None


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}
    return raw.get("rope_theta") or params.get("rope_theta") or 10000.0


def _parse_rope_scaling(scaling: dict | None, raw: dict) -> RopeScaling:
    params = raw.get("rope_parameters")
    if scaling is None and isinstance(params, dict) and params.get("rope_type") not in (None, "default"):
        scaling = params
    if not scaling:
        return RopeScaling()
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return RopeScaling(rope_type=rope_type, **{k: scaling[k] for k in keys if k in scaling})


def _sliding_window(raw: dict) -> int | None:
    window = raw.get("sliding_window")
    if raw.get("model_type") == "qwen2" and not raw.get("use_sliding_window", False):
        return None
    return int(window) if window else None
