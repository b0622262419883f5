"""Running facli's commands in this process (typer's CliRunner on facli.cli.app) and checking
that a user error ends as the CLI contract says: exit code 1, one `facli: error:` line on
stderr, no traceback."""

import inspect
import traceback

from typer.testing import CliRunner

from facli.cli import app

# Click before 8.2 mixes stderr into stdout unless told not to; later releases keep them apart.
_APART = ({"mix_stderr": False}
          if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters else {})


def invoke(args: list[str], env: dict | None = None, input: str | bytes | None = None):
    """The Result of `facli ARGS` run here; `env` entries set (None unsets) for the run."""
    return CliRunner(**_APART).invoke(app, [str(a) for a in args], env=env, input=input)


def error_line(result, *words: str, alone: bool = True) -> str:
    """The one `facli: error:` line of a failed run, checked to hold each of `words`. `alone`:
    nothing else was printed on stderr before it (no plan line, no notice)."""
    uncaught = None if isinstance(result.exception, (SystemExit, type(None))) else result.exception
    assert uncaught is None, "".join(traceback.format_exception(uncaught))
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("facli: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if alone:
        assert len(lines) == 1, result.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]
