"""ModelConfig: the architecture of a Llama-family checkpoint, read from config.json or a recipe."""

from dataclasses import dataclass, field, replace
from pathlib import Path

from facli.errors import FacliError
from facli.models.json_fields import Fields, read_json_object, shown
from facli.summarize.files import kind_of

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
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        """The config of config.json's (or a recipe's) values; a value of the wrong type or out
        of range is one FacliError naming `source`, the field and what it takes."""
        if not isinstance(raw, dict):
            raise FacliError(f"expected a JSON object ({{...}}) in {source}, got {shown(raw)}; "
                             "re-export the checkpoint's config")
        fields = Fields(raw, source)
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise FacliError(
                f"expected model_type one of {', '.join(SUPPORTED_MODEL_TYPES)} in {source}, "
                f"got {shown(model_type)}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in raw]
        if missing:
            raise FacliError(f"expected {', '.join(missing)} in {source}; the file is incomplete")
        heads = fields.whole("num_attention_heads")
        kv_heads = fields.whole("num_key_value_heads", default=heads)
        hidden = fields.whole("hidden_size")
        head_dim = fields.whole("head_dim", default=0)
        if head_dim == 0 and hidden % heads:
            fields.fail("hidden_size", f"a multiple of num_attention_heads ({heads}) where "
                        "head_dim is not given", hidden)
        if heads % kv_heads:
            fields.fail("num_attention_heads", "a multiple of num_key_value_heads "
                        f"({kv_heads})", heads)
        window = fields.whole("sliding_window", default=0, low=0)
        if model_type == "qwen2" and not fields.flag("use_sliding_window", False):
            window = 0
        return cls(
            model_type=model_type,
            vocab_size=fields.whole("vocab_size"),
            hidden_size=hidden,
            intermediate_size=fields.whole("intermediate_size"),
            num_hidden_layers=fields.whole("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=fields.whole("max_position_embeddings", default=2048),
            head_dim=head_dim,
            rms_norm_eps=fields.number("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(fields),
            rope_scaling=_rope_scaling(fields),
            tie_word_embeddings=fields.flag("tie_word_embeddings", False),
            attention_bias=fields.flag("attention_bias", model_type == "qwen2"),
            bos_token_id=fields.whole("bos_token_id", default=None, low=0),
            eos_token_ids=fields.token_ids("eos_token_id"),
            torch_dtype=fields.text("torch_dtype") or fields.text("dtype") or "float32",
            sliding_window=window or None,
        )

    @classmethod
    def from_dir(cls, directory: Path) -> "ModelConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            kind = "" if not path.exists() else f" ({path} is {kind_of(path.stat().st_mode)})"
            raise FacliError(
                f"expected config.json in {directory}, found none{kind}; point --model at a "
                "Hugging Face checkpoint directory"
            )
        config = cls.from_dict(read_json_object(path), str(path))
        # Chat checkpoints often end a turn with a token that only generation_config.json names
        # (Llama 3 Instruct's <|eot_id|>); transformers' generate stops at those too.
        generation = Path(directory) / "generation_config.json"
        if generation.is_file():
            extra = Fields(read_json_object(generation), str(generation)).token_ids("eos_token_id")
            merged = tuple(dict.fromkeys(config.eos_token_ids + extra))
            config = replace(config, eos_token_ids=merged)
        return config


def _rope_theta(fields: Fields) -> float:
    params = fields.table("rope_parameters")
    theta = fields.number("rope_theta", None)
    if theta is None and params is not None:
        theta = params.number("rope_theta", None)
    return theta or 10000.0


def _rope_scaling(fields: Fields) -> RopeScaling:
    """config.json's rope_scaling, or transformers 5's rope_parameters where it names a type."""
    scaling = fields.table("rope_scaling")
    params = fields.table("rope_parameters")
    if scaling is None and params is not None and params.text("rope_type") not in (None, "default"):
        scaling = params
    if scaling is None or not scaling.raw:
        return RopeScaling()
    rope_type = scaling.text("rope_type") or scaling.text("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise FacliError(
            f"expected rope_scaling type one of {', '.join(SUPPORTED_ROPE_TYPES)} in "
            f"{fields.source}, got {rope_type!r}; facli cannot run this checkpoint's position "
            "encoding"
        )
    values = {"factor": scaling.number("factor", None),
              "low_freq_factor": scaling.number("low_freq_factor", None),
              "high_freq_factor": scaling.number("high_freq_factor", None),
              "original_max_position_embeddings": scaling.whole(
                  "original_max_position_embeddings", default=None)}
    return RopeScaling(rope_type=rope_type, **{k: v for k, v in values.items() if v is not None})
