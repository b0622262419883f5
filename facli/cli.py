"""The `facli` command: thin Typer commands; the work lives in the modules they call."""

import functools
import os
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from facli import __version__
from facli.commands import bench, generate, perplexity, plan_memory, recipes, summarize
from facli.errors import FacliError


def _without_type_placeholders(params: list) -> list:
    """Help that shows what a value is, never a type placeholder such as `<bool>` or
    `<list[Path]>`: flags (the help option too) show nothing, an argument its metavar."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument" and param.metavar is not None:
            # Typer's rich help lists an argument's type beside its metavar; the metavar says it.
            param.display_type_rich = lambda ctx: None
            if hasattr(param, "type"):  # typer 0.27 asks the argument's click type instead
                param.type.get_metavar = lambda param, ctx=None: ""
    return params


class FacliCommand(TyperCommand):
    def get_params(self, ctx) -> list:
        return _without_type_placeholders(super().get_params(ctx))


class FacliGroup(TyperGroup):
    def get_params(self, ctx) -> list:
        return _without_type_placeholders(super().get_params(ctx))


app = typer.Typer(
    name="facli",
    cls=FacliGroup,
    help="Long-context offline LLM inference: plans memory first, shards over GPUs, offloads to host.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    try:
        return installed("facli")
    except PackageNotFoundError:
        return __version__


def _print_version(value: bool) -> None:
    if value:
        print(f"facli {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="Print facli's version and exit.")] = False,
) -> None:
    """facli: plans memory first, then runs long prompts on GPUs and host memory."""


def user_errors(command):
    """Turn a FacliError into one line on stderr and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FacliError as error:
            print(f"facli: error: {error}", file=sys.stderr, flush=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            print("facli: interrupted", file=sys.stderr, flush=True)
            raise typer.Exit(code=130) from None

    return wrapper


def _register() -> None:
    for name, command in (("generate", generate.generate), ("plan-memory", plan_memory.command),
                          ("summarize", summarize.command), ("perplexity", perplexity.command),
                          ("bench", bench.command),
                          ("recipes", recipes.list_recipes)):
        app.command(name, cls=FacliCommand)(user_errors(command))


_register()


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    app()


if __name__ == "__main__":
    main()
