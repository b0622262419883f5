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


def _register():
    from facli.commands import generate

    app.command("generate")(user_errors(generate.generate))
    for module_name, command_name in (
        ("recipes", "recipes"),
        ("plan_memory", "plan-memory"),
        ("summarize", "summarize"),
        ("bench", "bench"),
    ):
        try:
            module = __import__(f"facli.commands.{module_name}", fromlist=["command"])
        except ModuleNotFoundError as missing:
            if missing.name != f"facli.commands.{module_name}":
                raise
            continue
        app.command(command_name)(user_errors(getattr(module, "command", None) or module.list_recipes))


_register()


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    app()


if __name__ == "__main__":
    main()
