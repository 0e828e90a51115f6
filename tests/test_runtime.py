"""Devices, dtypes, memory modes, library verbosity, progress and one-line errors (safeguard.runtime)."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import standin_plugins
from fixtures import TEXT_LENGTH, tiny_pipeline_dir, tiny_policy_text
from safeguard import modelio, runtime
from safeguard.cli import cli
from safeguard.errors import ModelError, SafeguardError
from safeguard.plugins import pm

NOISE = ("LOAD REPORT", "Loading pipeline components", "initialized partially", "low cpu memory usage",
         "Loading weights", "Warning", "it/s]")


@pytest.fixture(autouse=True)
def default_settings():
    runtime.reset()
    yield
    runtime.reset()


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def save_tiny(tiny_pipeline_root, folder: Path, dtype=torch.float32, variant=None) -> Path:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), dtype=dtype)
    pipe.save_pretrained(folder, variant=variant)
    return folder


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEGUARD_DB", f"sqlite:///{tmp_path}/audit.db")
    monkeypatch.delenv("SAFEGUARD_DEVICE", raising=False)
    monkeypatch.delenv("SAFEGUARD_DTYPE", raising=False)
    (tmp_path / "policy.yaml").write_text(tiny_policy_text("tiny-runtime", judge="never-target"))
    pm.register(standin_plugins, name="test-judges")
    try:
        yield tmp_path
    finally:
        pm.unregister(name="test-judges")


def dtypes_on_disk(folder: Path) -> dict:
    return modelio.stored_format(folder).dtypes


# ----------------------------------------------------------------------------------------- device, dtype
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "_mps_available", lambda torch: False)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(runtime, "_mps_available", lambda torch: True)
    assert runtime.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(SafeguardError) as err:
        runtime.resolve_device("cuda:2")
    assert err.value.one_line() == "--device cuda:2: there are only 2 CUDA device(s) (fix: use cuda:0 to cuda:1)"


def test_device_and_dtype_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SAFEGUARD_DEVICE", "cpu")
    monkeypatch.setenv("SAFEGUARD_DTYPE", "bfloat16")
    assert runtime.reset() == runtime.Settings(device="cpu", dtype="bfloat16")
    assert runtime.resolve_dtype() is torch.bfloat16
    monkeypatch.delenv("SAFEGUARD_DEVICE")
    monkeypatch.delenv("SAFEGUARD_DTYPE")
    assert runtime.reset() == runtime.Settings()


def test_missing_accelerator_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SafeguardError, match="torch sees no CUDA device"):
        runtime.resolve_device("cuda")
    with pytest.raises(SafeguardError, match="unknown device 'gpu'"):
        runtime.resolve_device("gpu")


def test_auto_dtype_is_float32_on_cpu_and_the_stored_dtype_on_accelerators():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.resolve_dtype("auto", cpu, "float16") is torch.float32
    assert runtime.resolve_dtype("auto", cuda, "float16") is torch.float16
    assert runtime.resolve_dtype("auto", cuda, torch.bfloat16) is torch.bfloat16
    assert runtime.resolve_dtype("auto", cuda, None) is torch.float32
    assert runtime.resolve_dtype("bfloat16", cpu, "float16") is torch.bfloat16
    runtime.configure(dtype="float16")
    assert runtime.resolve_dtype(None, cpu) is torch.float16


def test_global_options_before_or_after_the_command_and_from_the_environment(monkeypatch):
    seen = []
    monkeypatch.setattr("safeguard.plugins.plugin_info", lambda include_builtin: seen.append(runtime.current()) or [])
    assert invoke("--device", "cpu", "--dtype", "float16", "plugins").exit_code == 0
    assert invoke("plugins", "--dtype", "bfloat16", "-v", "--debug").exit_code == 0
    monkeypatch.setenv("SAFEGUARD_DEVICE", "CPU")
    monkeypatch.setenv("SAFEGUARD_DTYPE", "float32")
    assert invoke("plugins").exit_code == 0
    assert invoke("--dtype", "float16", "plugins").exit_code == 0  # a flag beats the environment
    assert [(s.device, s.dtype, s.verbosity, s.debug) for s in seen] == [
        ("cpu", "float16", 0, False), ("auto", "bfloat16", 1, True), ("cpu", "float32", 0, False),
        ("cpu", "float16", 0, False)]
    bad = invoke("--device", "gpu0", "plugins")
    assert bad.exit_code == 2
    assert "Invalid value for '--device'" in bad.output and "use one of: auto, cpu, cuda, cuda:N or mps" in bad.output
    monkeypatch.setenv("SAFEGUARD_DTYPE", "half")
    assert invoke("plugins").exit_code == 2


# ------------------------------------------------------------------------------------ float16 model files
def test_fp16_folder_applies_and_probes_on_cpu_and_stays_fp16(ws, tiny_pipeline_root):
    save_tiny(tiny_pipeline_root, ws / "model", torch.float16)
    assert set(dtypes_on_disk(ws / "model").values()) == {"float16"}
    pipe = modelio.load_pipeline(ws / "model", device="cpu")
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}  # CPU computes in float32
    del pipe

    applied = invoke("apply", "policy.yaml", catch_exceptions=False)
    assert applied.exit_code == 0, applied.output
    run_id = re.search(r"^run (\S+): wrote", applied.stdout, re.M).group(1)
    assert dtypes_on_disk(ws / "edited") == {"text_encoder": "float16", "unet": "float16", "vae": "float16"}
    assert not list((ws / "edited").rglob("*.fp16.safetensors"))
    from safetensors import safe_open

    with safe_open(str(ws / "edited" / modelio.EDIT_TENSORS), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float16}

    probed = invoke("probe", run_id, catch_exceptions=False)
    assert probed.exit_code == 0, probed.output
    gate = invoke("gate", run_id)
    assert gate.stdout.splitlines()[0] == "PASS (exit 0)", gate.output

    # The originals round-trip exactly: revert gives back the input's float16 tensors bit for bit.
    assert invoke("revert", "edited", "--out", "restored", catch_exceptions=False).exit_code == 0
    from safetensors.torch import load_file

    before = load_file(ws / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(ws / "restored" / "unet" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    assert all(after[k].dtype == torch.float16 and torch.equal(before[k], after[k]) for k in before)


def test_fp16_variant_files_load_and_are_written_back_as_the_variant(tmp_path, tiny_pipeline_root):
    folder = save_tiny(tiny_pipeline_root, tmp_path / "model", torch.float16, variant="fp16")
    stored = modelio.stored_format(folder)
    assert stored.variant == "fp16" and set(stored.dtypes.values()) == {"float16"}
    pipe = modelio.load_pipeline(folder, device="cpu")
    assert pipe.unet.dtype is torch.float32
    pipe.unet.conv_in.weight.data.add_(1.0)  # an "edit"
    edited = pipe.unet.conv_in.weight.detach().clone()
    out = modelio.write_pipeline_atomically(pipe, tmp_path / "out", originals=None, record={"lineage": []},
                                            denoiser_name="unet")
    assert pipe.unet.dtype is torch.float32  # the model in memory computes on in float32
    assert sorted(p.name for p in (out / "unet").glob("*.safetensors")) == ["diffusion_pytorch_model.fp16.safetensors"]
    assert modelio.stored_format(out) == stored
    again = modelio.load_pipeline(out, device="cpu")
    assert torch.equal(again.unet.conv_in.weight, edited.to(torch.float16).to(torch.float32))


def test_explicit_dtype_is_honoured(tmp_path, tiny_pipeline_root):
    pipe = modelio.load_pipeline(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), device="cpu", dtype="bfloat16")
    assert pipe.unet.dtype is torch.bfloat16 and pipe.text_encoder.dtype is torch.bfloat16


# -------------------------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("value", [None, int(1e30)])
def test_tokenizer_without_model_max_length_is_one_line(ws, tiny_pipeline_root, value):
    shutil.copytree(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), ws / "model")
    config_path = ws / "model" / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("model_max_length")
    if value is not None:
        config["model_max_length"] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError) as err:
        modelio.load_pipeline(ws / "model")
    expected = (f"{ws / 'model' / 'tokenizer'}: model.source: tokenizer 'tokenizer' has no usable model_max_length "
                f"(not set), so prompts cannot be padded (fix: set \"model_max_length\": {TEXT_LENGTH} in "
                "tokenizer/tokenizer_config.json)")
    assert err.value.one_line() == expected
    result = invoke("apply", "policy.yaml")
    assert result.exit_code == 1
    assert result.output == f"Error: {expected}\n"


# --------------------------------------------------------------------------------------- quiet by default
def test_plugins_prints_only_the_plugin_list():
    from safeguard.plugins import plugin_info

    result = invoke("plugins")
    assert result.exit_code == 0
    expected = [f"{p['name']} {p['version'] or ''} {'(built-in) ' if p['builtin'] else ''}{', '.join(p['hooks'])}"
                for p in plugin_info(include_builtin=True)]
    assert result.output.splitlines() == expected


def _noisy_copy(tiny_pipeline_root, folder: Path) -> Path:
    """The tiny model with one tensor its text encoder does not have (transformers prints a load report)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), folder)
    weights = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    tensors["unused.weight"] = torch.zeros(2)
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def _apply_in_child(ws, *args):
    env = {**os.environ, "SAFEGUARD_PLUGINS_DIR": str(ws / "plugins")}
    env.pop("CI", None)
    (ws / "plugins").mkdir(exist_ok=True)
    shutil.copy(standin_plugins.__file__, ws / "plugins" / "standin_plugins.py")
    code = "import torch; torch.set_num_threads(1); from safeguard.cli import cli; cli()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ws, env=env, capture_output=True, text=True, timeout=600)


def test_apply_is_quiet_by_default_and_verbose_with_v(ws, tiny_pipeline_root):
    _noisy_copy(tiny_pipeline_root, ws / "model")
    quiet = _apply_in_child(ws, "apply", "policy.yaml")
    assert quiet.returncode == 0, quiet.stderr
    assert re.fullmatch(r"loaded model in \d+\.\ds; erasing 1 concept\(s\) with pure\n", quiet.stderr), quiet.stderr
    assert quiet.stdout.startswith("run ") and not any(n in quiet.stdout for n in NOISE)

    loud = _apply_in_child(ws, "apply", "policy.yaml", "--out", "edited-2", "-v")
    assert loud.returncode == 0, loud.stderr
    assert "LOAD REPORT" in loud.stderr and "UNEXPECTED" in loud.stderr
    assert "Loading pipeline components" in loud.stderr


def test_open_clip_root_warning_hidden_by_default(caplog):
    import logging

    record = logging.LogRecord("root", logging.WARNING, "/x/site-packages/open_clip/factory.py", 1,
                               "Model m initialized partially.", None, None)
    runtime.configure(verbosity=0)
    runtime.apply_library_settings()
    assert not logging.getLogger().filter(record)
    assert logging.getLogger().filter(logging.LogRecord("root", logging.WARNING, "/x/mine.py", 1, "kept", None, None))
    runtime.configure(verbosity=1)
    assert logging.getLogger().filter(record)


def test_embedded_judge_loads_without_noise(caplog, capfd):
    from safeguard.builtin.judge_open_clip import OpenClipJudge

    runtime.configure(verbosity=0, device="cpu")
    judge = OpenClipJudge("embedded:world-judge-v1")
    out, err = capfd.readouterr()
    assert judge.device == torch.device("cpu")
    assert not any(n in out + err + caplog.text for n in NOISE), out + err + caplog.text


def test_library_verbosity_follows_the_settings():
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    runtime.configure(verbosity=0)
    runtime.apply_library_settings()
    assert tlogging.get_verbosity() == tlogging.ERROR and not tlogging.is_progress_bar_enabled()
    assert dlogging.get_verbosity() == dlogging.ERROR and not dlogging.is_progress_bar_enabled()
    runtime.configure(verbosity=1)
    assert tlogging.get_verbosity() == tlogging.WARNING and tlogging.is_progress_bar_enabled()
    assert dlogging.get_verbosity() == dlogging.WARNING and dlogging.is_progress_bar_enabled()
    runtime.configure(verbosity=0)


# -------------------------------------------------------------------------------------- unexpected errors
def test_unexpected_error_is_one_line_naming_the_step_and_a_fix(ws, tiny_pipeline_root, monkeypatch):
    shutil.copytree(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), ws / "model")

    def out_of_memory(pipe, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB\nmore details")

    monkeypatch.setattr(runtime, "place_pipeline", out_of_memory)
    result = invoke("apply", "policy.yaml", "--device", "cpu")
    assert result.exit_code == 1
    assert result.output == (
        "Error: moving the model to cpu (float32): OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB "
        "(fix: --dtype float16 or --cpu-offload need less accelerator memory; --device cpu needs none)\n")
    debug = invoke("--debug", "apply", "policy.yaml")
    assert isinstance(debug.exception, torch.OutOfMemoryError)


def test_an_eraser_that_raises_is_one_line_naming_its_plugin(ws, tiny_pipeline_root):
    shutil.copytree(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), ws / "model")
    (ws / "policy.yaml").write_text(tiny_policy_text("tiny-runtime", eraser="exploding", params="{}"))
    result = invoke("apply", "policy.yaml")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (
        "Error: the 'exploding' eraser (plugin test-judges): RuntimeError: eraser blew up mid-edit "
        "(fix: run again with --debug for the traceback, and report it to the authors of test-judges)")
    debug = invoke("--debug", "apply", "policy.yaml")
    assert isinstance(debug.exception, RuntimeError) and str(debug.exception) == "eraser blew up mid-edit"


def test_unexpected_error_without_a_step_names_the_command(ws, monkeypatch):
    def broken_listing(include_builtin):
        raise KeyError("no such plugin table")

    monkeypatch.setattr("safeguard.plugins.plugin_info", broken_listing)
    result = invoke("plugins")
    assert result.exit_code == 1
    assert result.output == ("Error: safeguard plugins: KeyError: 'no such plugin table' "
                             "(fix: run again with --debug for the traceback, and report it)\n")


def test_cpu_offload_needs_an_accelerator(ws, tiny_pipeline_root):
    shutil.copytree(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), ws / "model")
    result = invoke("--device", "cpu", "--cpu-offload", "apply", "policy.yaml")
    assert result.exit_code == 1
    assert result.output == ("Error: --cpu-offload: needs an accelerator to offload to, and the device "
                             "is the CPU (fix: drop --cpu-offload, or choose --device cuda)\n")


# ----------------------------------------------------------------------------------------- memory modes
def test_attention_slicing_loads_sliced_and_captures_the_same_rows(tiny_pipeline_root):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    from safeguard.attention import capture_activations

    folder = tiny_pipeline_dir("sd1", root=tiny_pipeline_root)
    options = dict(steps=2, seeds=[0], guidance_scale=7.5)
    runtime.configure(device="cpu")
    plain = capture_activations(modelio.load_pipeline(folder), ["a photo of a cat"], **options)
    runtime.configure(attention_slicing=True)
    sliced_pipe = modelio.load_pipeline(folder)
    assert {type(p) for p in sliced_pipe.unet.attn_processors.values()} == {SlicedAttnProcessor}
    sliced = capture_activations(sliced_pipe, ["a photo of a cat"], **options)
    assert {type(p) for p in sliced_pipe.unet.attn_processors.values()} == {SlicedAttnProcessor}
    assert plain.keys() == sliced.keys()
    assert all(torch.allclose(plain[k], sliced[k], atol=1e-5) for k in plain)


# ---------------------------------------------------------------------------------------------- progress
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_counts_and_clears_on_a_terminal_only(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    stream = _Tty()
    bar = runtime.Progress("capturing activations", 2, stream=stream)
    assert bar.enabled
    bar.advance()
    bar.advance()
    bar.close()
    first, last = "capturing activations: 1/2 (0s, ETA 0s)", "capturing activations: 2/2 (0s)"
    # the shorter final line is padded over the longer one before it
    assert stream.getvalue() == "\r" + first + "\r" + last.ljust(len(first)) + "\r" + " " * len(last) + "\r"
    assert not runtime.Progress("x", 1, stream=io.StringIO()).enabled  # not a terminal
    runtime.configure(quiet=True)
    assert not runtime.Progress("x", 1, stream=_Tty()).enabled
    runtime.configure(quiet=False)
    monkeypatch.setenv("CI", "true")
    assert not runtime.Progress("x", 1, stream=_Tty()).enabled
