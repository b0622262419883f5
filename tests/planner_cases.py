"""The recipe and options shorthands the planner tests share."""

from facli.planner.search import PlanOptions
from facli.models.recipe_loader import load_model_recipe


def model(name):
    return load_model_recipe(name).config


def options(**values):
    return PlanOptions(model_name=values.pop("model_name", "m"), **values)
