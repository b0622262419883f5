"""The `facli` command: thin Typer commands; the work lives in the modules they call."""

import functools
import os
import sys

import typer

from facli.errors import FacliError

app = typer.Typer(
    name="facli",
    help="Long-context offline LLM inference: plans memory first, shards over GPUs, offloads to host.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """facli: plans memory first, then runs long prompts on GPUs and host memory."""


def user_errors(command):
    """Turn a FacliError into one line on stderr and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FacliError as error:
            print(f"facli: error: {error}", file=sys.stderr)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            print("facli: interrupted", file=sys.stderr)
            raise typer.Exit(code=130) from None

    return wrapper


def _register() -> None:
    from facli.commands import bench, generate, plan_memory, recipes, summarize

    app.command("generate")(user_errors(generate.generate))
    app.command("plan-memory")(user_errors(plan_memory.command))
    app.command("summarize")(user_errors(summarize.command))
    app.command("bench")(user_errors(bench.command))
    app.command("recipes")(user_errors(recipes.list_recipes))


_register()


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    app()


if __name__ == "__main__":
    main()
