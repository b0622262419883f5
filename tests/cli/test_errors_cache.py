"""The demo model's cache folder: an unusable FACLI_CACHE is one line naming the variable and
the fix; a damaged cached demo is found and written again atomically, or, where it cannot be,
one line says what to delete."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from cli_errors import error_line, invoke
from facli.models import demo

GENERATE = ["generate", "--prompt", "Hello", "--device", "cpu", "--max-new-tokens", "4",
            "--json"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A cache holding a freshly written demo model, copied by each test that damages one."""
    cache = tmp_path_factory.mktemp("pristine")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACLI_CACHE", str(cache))
        demo.ensure_demo_checkpoint()
    return cache


@pytest.fixture()
def cache(pristine, tmp_path, monkeypatch):
    copy = tmp_path / "cache"
    shutil.copytree(pristine, copy)
    monkeypatch.setenv("FACLI_CACHE", str(copy))
    return copy


def test_facli_cache_naming_a_file(tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    result = invoke(GENERATE, env={"FACLI_CACHE": str(tmp_path / "cache")})
    error_line(result, "expected FACLI_CACHE to name a folder", "which is a file",
               "point FACLI_CACHE at a folder facli can write, or unset it")
    assert (tmp_path / "cache").read_text() == "not a folder"


def test_facli_cache_below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    result = invoke(GENERATE, env={"FACLI_CACHE": str(tmp_path / "file" / "cache")})
    error_line(result, "expected FACLI_CACHE to name a folder", f"and {tmp_path / 'file'} is a file")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's read-only /sys")
def test_facli_cache_where_nothing_can_be_written():
    """/sys takes no new folders, even from root."""
    result = invoke(GENERATE, env={"FACLI_CACHE": "/sys/facli-test-cache"})
    error_line(result, "expected FACLI_CACHE to name a folder facli can write",
               "/sys/facli-test-cache", "point FACLI_CACHE at a folder facli can write")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through folder permissions")
def test_facli_cache_in_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        result = invoke(GENERATE, env={"FACLI_CACHE": str(locked)})
    finally:
        locked.chmod(0o700)
    error_line(result, "FACLI_CACHE to name a folder facli can write", "ermission denied")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's read-only /sys")
def test_xdg_cache_home_is_named_where_it_chose_the_folder():
    result = invoke(GENERATE, env={"FACLI_CACHE": None, "XDG_CACHE_HOME": "/sys/facli-xdg"})
    error_line(result, "expected XDG_CACHE_HOME to name a folder facli can write",
               "/sys/facli-xdg/facli", "set FACLI_CACHE to a folder facli can write")


def _truncate_weights(directory: Path) -> None:
    weights = directory / demo.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])


def _corrupt_weights_header(directory: Path) -> None:
    weights = directory / demo.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[8:24] = b"\xff" * 16  # same size: only the header check finds it
    weights.write_bytes(bytes(data))


def _replace_with_file(directory: Path) -> None:
    shutil.rmtree(directory)
    directory.write_text("")


DAMAGE = {
    "weights-cut-short": (_truncate_weights, "model.safetensors holds"),
    "weights-header-garbled": (_corrupt_weights_header, "model.safetensors is corrupt"),
    "tokenizer-missing": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "config-garbage": (lambda d: (d / "config.json").write_text("{garbage"), "config.json"),
    "config-same-size-other-values": (
        lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text().replace('"num_hidden_layers": 4',
                                                    '"num_hidden_layers": 5')),
        "config.json differs from the one written"),
    "manifest-missing": (lambda d: (d / demo.MANIFEST).unlink(), "facli-demo.json is missing"),
    "manifest-garbage": (lambda d: (d / demo.MANIFEST).write_text("[]"), "facli-demo.json"),
    "a-file-in-its-place": (_replace_with_file, "it is not a folder"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_demo_is_found_and_written_again(cache, pristine, damage, capsys):
    target = cache / demo.DEMO_NAME
    spoil, reason = DAMAGE[damage]
    spoil(target)
    assert reason in demo.demo_problem(target)
    assert demo.ensure_demo_checkpoint() == target
    assert reason in capsys.readouterr().err
    assert demo.demo_problem(target) is None
    assert os.listdir(cache) == [demo.DEMO_NAME]  # no staging or replaced folder left behind
    for name in os.listdir(pristine / demo.DEMO_NAME):  # written deterministically
        assert (target / name).read_bytes() == (pristine / demo.DEMO_NAME / name).read_bytes()


@pytest.mark.slow
def test_generate_on_a_cut_short_cache_writes_it_again_and_runs(cache):
    _truncate_weights(cache / demo.DEMO_NAME)
    result = invoke(GENERATE)
    assert result.exit_code == 0, result.stderr
    assert "model.safetensors holds" in result.stderr and "writing it again" in result.stderr
    assert len(json.loads(result.stdout.splitlines()[-1])["token_ids"]) == 4
    assert demo.demo_problem(cache / demo.DEMO_NAME) is None


@pytest.mark.parametrize("refused", ["moving-the-old-aside", "renaming-the-new-in"])
def test_a_demo_that_cannot_be_replaced_says_what_to_delete(cache, monkeypatch, refused):
    target = cache / demo.DEMO_NAME
    _truncate_weights(target)
    real_rename = Path.rename

    def rename(self, destination):
        moving_aside = self == target
        renaming_in = self.name == demo.BUILT and Path(destination) == target
        if moving_aside if refused == "moving-the-old-aside" else renaming_in:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_rename(self, destination)

    monkeypatch.setattr(Path, "rename", rename)
    result = invoke(GENERATE)
    error_line(result, f"expected a usable demo model in {target} (model.safetensors holds",
               "Permission denied", f"delete {target} and run again", alone=False)
    assert os.listdir(cache) == [demo.DEMO_NAME]  # the staging dir is gone, the old one stays
    assert "model.safetensors holds" in demo.demo_problem(target)


def test_a_full_disk_while_writing_the_demo_is_one_line(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(demo, "save_file", disk_full)
    result = invoke(GENERATE, env={"FACLI_CACHE": str(tmp_path / "cache")})
    error_line(result, "expected room to write the demo model", "No space left on device",
               "point FACLI_CACHE at a folder facli can write")
    assert os.listdir(tmp_path / "cache") == []
