"""Recipe data: `models/*.toml` and `hardware/*.toml`. The loading code lives in
facli.models.recipe_loader; its public names are re-exported here so that
`from facli.recipes import load_model_recipe` works."""

from facli.models.recipe_loader import (
    ModelRecipe,
    list_hardware_recipes,
    list_model_recipes,
    load_model_recipe,
    resolve_model_config,
    resolve_weights_dir,
)

__all__ = [
    "ModelRecipe",
    "list_hardware_recipes",
    "list_model_recipes",
    "load_model_recipe",
    "resolve_model_config",
    "resolve_weights_dir",
]
