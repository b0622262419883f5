"""`facli recipes`: the model and hardware recipes that --model and --hardware accept."""

import os
from pathlib import Path

from facli.recipe_loader import (
    list_hardware_recipes,
    list_model_recipes,
    load_model_recipe,
    read_recipe,
)


def _weights_status(recipe) -> str:
    from_env = os.environ.get(recipe.weights_env)
    path = Path(from_env or recipe.default_path).expanduser()
    found = (path / "config.json").is_file()
    source = f"${recipe.weights_env}" if from_env else recipe.default_path
    return f"{'found' if found else 'absent'}: {source} (or set {recipe.weights_env})"


def list_recipes() -> None:
    """List model recipes (for --model) and hardware recipes (for --hardware)."""
    print("models (--model NAME):")
    models = [load_model_recipe(name) for name in list_model_recipes()]
    width = max(len(m.name) for m in models)
    for recipe in models:
        print(f"  {recipe.name.ljust(width)}  {recipe.description}")
        print(f"  {' ' * width}  weights {_weights_status(recipe)}")
    print("hardware (--hardware NAME, or auto for this machine):")
    names = list_hardware_recipes()
    width = max(len(n) for n in names)
    for name in names:
        print(f"  {name.ljust(width)}  {read_recipe('hardware', name).get('description', '')}")
