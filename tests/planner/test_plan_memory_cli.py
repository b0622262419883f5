"""`facli plan-memory` and `facli recipes` as a user runs them."""

import inspect
import json
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from facli.cli import app
from facli.models.recipe_loader import list_hardware_recipes, list_model_recipes

# stdout and stderr apart: the default from click 8.2 on, an argument before it.
runner = CliRunner(**({"mix_stderr": False}
                      if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters else {}))


def run(*args):
    return runner.invoke(app, list(args))


def test_table_for_the_fastattention_setup():
    result = run("plan-memory", "--model", "llama-7b", "--ctx", "256k", "--hardware", "8xV100-32GB")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for words in ("cuda:0", "weights", "KV", "activations", "free", "host: KV offloaded",
                  "decode mode", "time to first token", "tokens/s", "fits", "why:"):
        assert words in out, words


def test_json_is_one_object_on_the_last_line():
    result = run("plan-memory", "--model", "llama-7b", "--ctx", "256k", "--hardware",
                 "1xH200-141GB", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert plan["schema_version"] == 1 and plan["ctx"] == 262144 and plan["fits"]
    assert plan["host"]["layers"]  # 128 GiB of KV does not all fit on one H200


def test_options_reach_the_plan():
    result = run("plan-memory", "--model", "llama-7b", "--ctx", "64k", "--batch", "2",
                 "--hardware", "8xH200-141GB", "--devices", "2", "--kv-dtype", "fp8",
                 "--prefill-chunk", "4096", "--margin", "10%", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout.splitlines()[-1])
    assert (plan["tp"], plan["batch"], plan["kv_dtype"], plan["prefill_chunk"]) == (2, 2, "fp8", 4096)
    assert plan["devices"][0]["margin_bytes"] == int(plan["devices"][0]["capacity_bytes"] * 0.10)


def test_decode_mode_option():
    result = run("plan-memory", "--model", "llama-7b", "--ctx", "256k", "--hardware",
                 "1xH200-141GB", "--decode-mode", "cpu", "--json")
    assert json.loads(result.stdout.splitlines()[-1])["decode_mode"] == "cpu"


def test_allreduce_tile_option():
    result = run("plan-memory", "--model", "llama-7b", "--ctx", "32k", "--hardware", "2xH200-141GB",
                 "--devices", "2", "--allreduce-tile-tokens", "2048", "--json")
    assert json.loads(result.stdout.splitlines()[-1])["allreduce_tile_tokens"] == 2048


def test_nothing_fits_is_one_line_and_exit_1():
    result = run("plan-memory", "--model", "llama-7b", "--ctx", "256k", "--hardware",
                 "1xRTX4090-24GB")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "short by" in lines[0]
    assert "largest context that fits here" in lines[0] and "Traceback" not in result.output


@pytest.mark.parametrize(("args", "words"), [
    (("--hardware", "9xNothing"), "8xV100-32GB"),
    (("--model", "llama-99b"), "llama-7b"),
    (("--devices", "3", "--hardware", "8xH200-141GB"), "dividing"),
    (("--devices", "some"), "expected --devices a number from 1 to 2147483648, or auto, got 'some'"),
    (("--dtype", "fp8"), "weight dtype"),
    (("--ctx", "lots"), "context length"),
    (("--kv-dtype", "int3"), "dtype"),
    (("--decode-mode", "disk"), "decode-mode"),
], ids=["hardware", "model", "devices", "devices-word", "dtype", "ctx", "kv-dtype", "decode-mode"])
def test_user_errors(args, words):
    base = {"--model": "llama-7b", "--hardware": "1xH200-141GB"}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    result = run("plan-memory", *[x for pair in base.items() for x in pair])
    assert result.exit_code == 1, result.output
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_model_directory(tmp_path):
    raw = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
           "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    result = run("plan-memory", "--model", str(tmp_path), "--ctx", "8k", "--hardware",
                 "1xA100-80GB", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["weight_dtype"] == "bf16"


def test_demo_model_on_this_machine():
    demo = pytest.importorskip("facli.models.demo")
    result = run("plan-memory", "--ctx", "4k", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["model"] == "random-demo"


def test_recipes_lists_models_and_hardware():
    result = run("recipes")
    assert result.exit_code == 0, result.output
    for name in list_model_recipes() + list_hardware_recipes():
        assert name in result.stdout
    assert "FACLI_LLAMA_7B" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("facli") is None, reason="console script not installed")
def test_console_script():
    done = subprocess.run(["facli", "plan-memory", "--model", "qwen2-7b", "--ctx", "128k",
                           "--hardware", "2xH200-141GB", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["model"] == "qwen2-7b"


def test_a_batch_plan_says_its_prompts_prefill_one_after_another():
    one = run("plan-memory", "--model", "llama-7b", "--ctx", "4k", "--hardware", "1xH200-141GB")
    eight = run("plan-memory", "--model", "llama-7b", "--ctx", "4k", "--batch", "8", "--hardware",
                "1xH200-141GB")
    assert one.exit_code == eight.exit_code == 0

    def seconds(output, phrase):
        line = next(line for line in output.splitlines() if line.startswith("predicted:"))
        assert line.startswith(f"predicted: {phrase} ")
        return float(line[len(f"predicted: {phrase} "):].split(" s,")[0])

    assert seconds(eight.stdout, "prefill of 8 full-context prompts, one after another,") == pytest.approx(
        8 * seconds(one.stdout, "time to first token"), rel=0.02)


def test_a_batch_plan_says_whether_its_rows_decode_together():
    """Rows (summarize --batch, bench --batch) need the whole cache on the GPUs: 10 rows of 32K
    keep 10 layers in host memory on one H200, where 7 rows would not."""
    def rows_line(batch, *extra):
        result = run("plan-memory", "--model", "llama-7b", "--ctx", "32k", "--batch", str(batch),
                     "--hardware", "1xH200-141GB", *extra)
        assert result.exit_code == 0, result.output
        return [line for line in result.stdout.splitlines() if line.startswith("rows:")]

    assert rows_line(10) == ["rows: summarize --batch and bench --batch decode sequences together "
                             "only with the whole KV cache on the GPUs, which this plan does not "
                             "keep; up to 7 rows keep it there at ctx 32k"]
    assert rows_line(4) == ["rows: the 4 sequences decode together from one cache on the GPUs "
                            "(summarize --batch, bench --batch)"]
    assert rows_line(10, "--kv-dtype", "fp8") == [
        "rows: the 10 sequences decode together from one cache on the GPUs (summarize --batch, "
        "bench --batch)"]
    assert rows_line(1) == []


def test_batch_auto_plans_the_most_rows_that_stay_on_the_gpus():
    auto = run("plan-memory", "--model", "llama-7b", "--ctx", "32k", "--batch", "auto",
               "--hardware", "1xH200-141GB")
    assert auto.exit_code == 0, auto.output
    assert auto.stdout.splitlines()[0].startswith("llama-7b: ctx 32k x batch 7 on 1xH200-141GB")
    assert "rows: the 7 sequences decode together" in auto.stdout
    # 14 fp8 rows decode 1.27x the 7 bf16 rows on one H200 (docs/performance.md).
    hint = ("  - hint: --kv-dtype fp8 (e4m3 with a scale per token and head, lossy) would keep 14 "
            "rows of ctx 32k on the GPUs: decode ")
    assert [line for line in auto.stdout.splitlines() if line.startswith(hint)]
    as_json = run("plan-memory", "--model", "llama-7b", "--ctx", "32k", "--batch", "auto",
                  "--hardware", "1xH200-141GB", "--json")
    assert any(line.startswith(hint[4:]) for line in
               json.loads(as_json.stdout.splitlines()[-1])["explanation"])
    wrong = run("plan-memory", "--model", "llama-7b", "--batch", "some")
    assert wrong.exit_code == 1
    assert wrong.stderr.strip() == ("facli: error: expected --batch a number from 1 to 2147483648, "
                                    "or auto, got 'some'")


def test_a_context_a_run_would_refuse_is_planned_with_a_warning():
    """plan-memory warns exactly where generate refuses (facli.models.resolve.check_context): past
    llama-7b's 2048 trained positions without --allow-ctx-extension; the plan still prints."""
    warning = ("facli: warning: generate and summarize would stop here: expected --ctx at most the "
               "model's max_position_embeddings (2048), got 2049; pass --allow-ctx-extension")
    for ctx, warned in (("2048", False), ("2049", True)):
        result = run("plan-memory", "--model", "llama-7b", "--ctx", ctx, "--hardware", "1xH200-141GB")
        assert result.exit_code == 0 and "fits" in result.stdout.splitlines(), result.output
        assert result.stderr.startswith(warning) == warned, result.stderr
        assert len(result.stderr.splitlines()) == int(warned)
    allowed = run("plan-memory", "--model", "llama-7b", "--ctx", "256k", "--hardware", "8xV100-32GB",
                  "--allow-ctx-extension", "--json")
    assert allowed.exit_code == 0 and allowed.stderr == ""
    assert json.loads(allowed.stdout.splitlines()[-1])["ctx"] == 256 * 1024


def test_a_sliding_window_a_run_refuses_warns_even_with_the_extension_flag():
    result = run("plan-memory", "--model", "mistral-7b", "--ctx", "8k", "--hardware", "1xH200-141GB",
                 "--allow-ctx-extension")
    assert result.exit_code == 0
    assert "warning: generate and summarize would stop here: expected --ctx at most the model's " \
           "sliding_window (4096)" in result.stderr


def test_context_left_out_is_the_models_trained_length():
    for name, tokens in (("llama-7b", 2048), ("llama-3-8b", 8192)):
        result = run("plan-memory", "--model", name, "--hardware", "1xH200-141GB", "--json")
        assert result.exit_code == 0 and result.stderr == ""
        assert json.loads(result.stdout.splitlines()[-1])["ctx"] == tokens


def test_one_device_prints_no_allreduce_tile():
    def settings_line(*args):
        result = run("plan-memory", "--model", "llama-7b", "--ctx", "32k", *args)
        assert result.exit_code == 0, result.output
        return next(line for line in result.stdout.splitlines() if line.startswith("tensor parallel"))

    one = settings_line("--hardware", "1xH200-141GB")
    assert one.startswith("tensor parallel 1, prefill chunk ") and "AllReduce" not in one
    two = settings_line("--hardware", "2xH200-141GB", "--devices", "2")
    assert two.startswith("tensor parallel 2, prefill chunk ") and ", AllReduce tile " in two


def test_dtype_and_devices_auto_reach_the_plan():
    fp32 = run("plan-memory", "--model", "llama-7b", "--ctx", "2k", "--hardware", "1xA100-80GB",
               "--dtype", "fp32", "--json")
    plan = json.loads(fp32.stdout.splitlines()[-1])
    assert (plan["weight_dtype"], plan["kv_dtype"]) == ("fp32", "fp32")
    picked = run("plan-memory", "--model", "llama-7b", "--ctx", "2k", "--hardware", "8xH200-141GB",
                 "--json")
    auto = run("plan-memory", "--model", "llama-7b", "--ctx", "2k", "--hardware", "8xH200-141GB",
               "--devices", "auto", "--json")
    assert json.loads(picked.stdout.splitlines()[-1]) == json.loads(auto.stdout.splitlines()[-1])


def test_the_former_hardware_names_plan_on_the_renamed_recipes():
    result = run("plan-memory", "--model", "llama-7b", "--ctx", "2k", "--hardware", "2xH200")
    assert result.exit_code == 0
    assert result.stdout.startswith("llama-7b: ctx 2k x batch 1 on 2xH200-141GB ")


def test_recipes_json_is_one_object_on_the_last_line():
    result = run("recipes", "--json")
    assert result.exit_code == 0
    listing = json.loads(result.stdout.strip().splitlines()[-1])
    assert [m["name"] for m in listing["models"]] == list_model_recipes()
    assert [h["name"] for h in listing["hardware"]] == list_hardware_recipes()
    llama = next(m for m in listing["models"] if m["name"] == "llama-7b")
    assert llama["weights_env"] == "FACLI_LLAMA_7B" and llama["max_position_embeddings"] == 2048
