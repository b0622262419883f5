"""`facli recipes`: the model and hardware recipes that --model and --hardware accept."""

import json
import os
from pathlib import Path

from facli import options
from facli.models.recipe_loader import (
    list_hardware_recipes,
    list_model_recipes,
    load_model_recipe,
    read_recipe,
)


def _weights(recipe) -> dict:
    """Where the recipe's weights are looked for, and whether a checkpoint is there."""
    from_env = os.environ.get(recipe.weights_env)
    path = Path(from_env or recipe.default_path).expanduser()
    return {"weights_env": recipe.weights_env, "weights_dir": str(path),
            "weights_found": (path / "config.json").is_file(),
            "weights_source": f"${recipe.weights_env}" if from_env else recipe.default_path}


def list_recipes(as_json: options.Json = False) -> None:
    """List model recipes (for --model) and hardware recipes (for --hardware)."""
    models = [(recipe, _weights(recipe))
              for recipe in (load_model_recipe(name) for name in list_model_recipes())]
    hardware = [(name, str(read_recipe("hardware", name).get("description", "")))
                for name in list_hardware_recipes()]
    if as_json:
        print(json.dumps({
            "models": [{"name": recipe.name, "description": recipe.description,
                        "max_position_embeddings": recipe.config.max_position_embeddings,
                        **{key: value for key, value in weights.items() if key != "weights_source"}}
                       for recipe, weights in models],
            "hardware": [{"name": name, "description": description}
                         for name, description in hardware]}))
        return
    print("models (--model NAME):")
    width = max(len(recipe.name) for recipe, _ in models)
    for recipe, weights in models:
        found = "found" if weights["weights_found"] else "absent"
        print(f"  {recipe.name.ljust(width)}  {recipe.description}")
        print(f"  {' ' * width}  weights {found}: {weights['weights_source']} "
              f"(or set {recipe.weights_env})")
    print("hardware (--hardware NAME, or auto for this machine):")
    width = max(len(name) for name, _ in hardware)
    for name, description in hardware:
        print(f"  {name.ljust(width)}  {description}")
