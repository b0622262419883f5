"""Model and hardware recipes: commented TOML files shipped in `facli.recipes`.

A model recipe names an architecture (config.json values) and where a user keeps its weights;
a hardware recipe describes GPUs, host memory and link rates for what-if planning. This module
finds, reads and validates them; the hardware side is turned into a HardwareSpec by
`facli.planner.hardware`.
"""

import os
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from facli.errors import FacliError
from facli.models.config import ModelConfig
from facli.models.default_model import RANDOM_DEMO, default_gguf, default_model_name
from facli.models.gguf_checkpoint import gguf_file_in, gguf_model_config

_PACKAGE = "facli.recipes"
_KINDS = ("models", "hardware")


def _recipe_dir(kind: str):
    assert kind in _KINDS, kind
    return resources.files(_PACKAGE).joinpath(kind)


def recipe_names(kind: str) -> list[str]:
    """Sorted names of the recipes of one kind ("models" or "hardware")."""
    return sorted(
        entry.name[: -len(".toml")]
        for entry in _recipe_dir(kind).iterdir()
        if entry.name.endswith(".toml")
    )


def list_model_recipes() -> list[str]:
    return recipe_names("models")


def list_hardware_recipes() -> list[str]:
    return recipe_names("hardware")


def read_recipe(kind: str, name: str) -> dict:
    """The parsed TOML of recipe `name`; an unknown name lists the valid ones."""
    names = recipe_names(kind)
    if name not in names:
        what = "model recipe" if kind == "models" else "hardware recipe"
        raise FacliError(
            f"expected a {what} name, one of {', '.join(names)}; got {name!r}"
            + ("; or pass a checkpoint directory" if kind == "models" else "")
        )
    text = _recipe_dir(kind).joinpath(f"{name}.toml").read_text(encoding="utf-8")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # a broken shipped file is a bug, but say which
        raise FacliError(f"expected valid TOML in recipe {kind}/{name}.toml, got: {exc}") from None


@dataclass(frozen=True)
class ModelRecipe:
    """A named model: its architecture and where its weights are looked for."""

    name: str
    description: str
    config: ModelConfig
    weights_env: str
    default_path: str
    hf_repo: str = ""

    def __post_init__(self):
        if not self.weights_env or not self.default_path:
            raise FacliError(
                f"expected weights_env and default_path in recipe {self.name}, got "
                f"{self.weights_env!r} and {self.default_path!r}"
            )


def load_model_recipe(name: str) -> ModelRecipe:
    raw = read_recipe("models", name)
    if not isinstance(raw.get("config"), dict):
        raise FacliError(f"expected a [config] table in model recipe {name}, found none")
    return ModelRecipe(
        name=name,
        description=str(raw.get("description", "")),
        config=ModelConfig.from_dict(dict(raw["config"]), f"model recipe {name}"),
        weights_env=str(raw.get("weights_env", "")),
        default_path=str(raw.get("default_path", "")),
        hf_repo=str(raw.get("hf_repo", "")),
    )


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_weights_dir(recipe: ModelRecipe) -> Path:
    """The checkpoint directory of a recipe: $weights_env if set, else default_path.

    Raises FacliError naming the variable and the directory when no checkpoint is there.
    """
    layout = "a Hugging Face checkpoint: config.json, tokenizer files and *.safetensors"
    source = f" (for example {recipe.hf_repo})" if recipe.hf_repo else ""
    from_env = os.environ.get(recipe.weights_env)
    if from_env:
        path = Path(from_env).expanduser()
        if _is_checkpoint(path):
            return path
        raise FacliError(
            f"expected {layout} in {path} (from ${recipe.weights_env}), found no config.json "
            f"there; put the {recipe.name} weights{source} in that directory or point "
            f"{recipe.weights_env} at the right one"
        )
    path = Path(recipe.default_path).expanduser()
    if _is_checkpoint(path):
        return path
    raise FacliError(
        f"expected the {recipe.name} weights, {layout}, in {path}, found none; put them there"
        f"{source} or set {recipe.weights_env}=/path/to/checkpoint"
    )


def resolve_model_config(model: str | None) -> tuple[str, ModelConfig]:
    """`--model` as the planner needs it: (display name, config), with no weights read.

    None means $FACLI_MODEL, else the trained default; a .gguf file (or a folder holding one) is
    read for its header; a directory for config.json; `random-demo` is the small random model;
    any other value must be a recipe name.
    """
    model = model or default_model_name()
    if model is None:
        gguf = default_gguf()
        return gguf.stem, gguf_model_config(gguf)
    if model == RANDOM_DEMO:
        # Imported here: demo imports torch, which the planner's modules load without.
        from facli.models import demo

        return RANDOM_DEMO, demo.demo_config()
    path = Path(model).expanduser()
    gguf = gguf_file_in(path) if path.exists() else None
    if gguf is not None:
        return gguf.stem, gguf_model_config(gguf)
    if path.is_dir():
        return path.name or str(path), ModelConfig.from_dir(path)
    if model in list_model_recipes():
        return model, load_model_recipe(model).config
    raise FacliError(
        f"expected --model to be a checkpoint folder, a .gguf file, {RANDOM_DEMO} or a recipe "
        f"name ({', '.join(list_model_recipes())}), got {model!r}, which is none of these"
    )