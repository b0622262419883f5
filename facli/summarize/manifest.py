"""The run manifest beside the output: model, settings, plan, and one entry per run.

Resuming with settings that change what a summary would be (model, seed, prompt, ...) would mix
two kinds of results in one file, so it is refused.
"""

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import facli
from facli.errors import FacliError
from facli.summarize.files import MANIFEST_LIMIT, read_user_file
from facli.summarize.output import write_atomic


def manifest_path(output: Path) -> Path:
    """`results.jsonl` -> `results.manifest.json`."""
    output = Path(output)
    return output.with_name(f"{output.stem if output.suffix else output.name}.manifest.json")


def config_hash(config) -> str:
    """A hash of the model architecture (a ModelConfig or a plain dict)."""
    raw = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    text = json.dumps(raw, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def text_hash(text: str | None) -> str | None:
    return None if text is None else "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def read_manifest(path: Path) -> dict | None:
    """The manifest at `path` (None when there is none); one FacliError line for one that is no
    manifest, or larger than files.MANIFEST_LIMIT."""
    path = Path(path)
    if not path.exists():
        return None
    fix = "delete it or choose another --out"
    data = read_user_file(path, MANIFEST_LIMIT, "run manifest", fix)
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FacliError(f"expected a JSON run manifest at {path}, got an unreadable file ({exc}); "
                         f"{fix}") from None
    shapes = {"model": dict, "settings": dict, "runs": list}
    if not isinstance(manifest, dict) or any(
            not isinstance(manifest.get(key, kind()), kind) for key, kind in shapes.items()):
        raise FacliError(f"expected a run manifest at {path} (a JSON object with model, settings "
                         f"and runs), got {type(manifest).__name__} of another shape; {fix}")
    return manifest


def check_resumable(previous: dict | None, model: dict, settings: dict, output: Path) -> None:
    """Refuse to append to results made with another model or other settings."""
    if previous is None:
        return
    before = {"model config": previous.get("model", {}).get("config_hash"), **previous.get("settings", {})}
    now = {"model config": model["config_hash"], **settings}
    for key, value in now.items():
        if key in before and before[key] != value:
            raise FacliError(
                f"expected the {key} of the run that wrote {output} ({before[key]!r}), got "
                f"{value!r}; rerun with the same settings or choose another --out"
            )


def new_manifest(previous: dict | None, *, model: dict, settings: dict, plan: dict) -> dict:
    return {
        "facli_version": facli.__version__,
        "model": model,
        "settings": settings,
        "plan": plan,
        "runs": list((previous or {}).get("runs", [])),
    }


def start_run(manifest: dict, run: dict) -> dict:
    """Add a run entry (`finished` stays None until the run ends)."""
    entry = {"started": _now(), "finished": None, **run}
    manifest["runs"].append(entry)
    return entry


def finish_run(entry: dict, summary: dict) -> None:
    entry.update(summary, finished=_now())


def write_manifest(path: Path, manifest: dict) -> None:
    data = json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n"
    write_atomic(path, data.encode("utf-8"))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
