"""The recipe and options shorthands the planner tests share."""

from facli.models.recipe_loader import load_model_recipe
from facli.planner.search import PlanOptions


def model(name):
    return load_model_recipe(name).config


def options(**values):
    return PlanOptions(model_name=values.pop("model_name", "m"), **values)
