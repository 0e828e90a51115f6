"""The checkpoints users have: single-file .safetensors (A1111/ComfyUI) in and out, hub ids from the local cache."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from fixtures import tiny_pipeline_dir
from safeguard import modelio, singlefile
from safeguard.cli import cli
from safeguard.db import open_db
from safeguard.errors import ModelError
from safeguard.modelio import EDIT_RECORD, load_pipeline

POLICY = """\
version: 1
name: tiny-single-file
model:
  source: {source}
{config}eraser:
  name: pure
  params: {{steps: 2, seeds: 1}}
concepts:
  - name: pikachu
    category: character
    forget_anchors: [a photo of pikachu, pikachu in a garden]
    neighbours: [mario]
probes:
  kinds: [canonical]
  images_per_prompt: 2
  max_images: 4
  steps: 2
  max_prompts: 1
thresholds:
  max_leakage: 0.8
  min_elicitation: 0.0
judge:
  name: never-target
  checkpoint: none
gate:
  required: []
output:
  dir: edited
"""


@pytest.fixture
def ws(standin_empty_workspace):
    return standin_empty_workspace


def write_policy(ws, source, config=None):
    (ws / "policy.yaml").write_text(POLICY.format(source=source, config=f"  config: {config}\n" if config else ""))


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def states(pipe):
    return {name: getattr(pipe, name).state_dict() for name in ("unet", "vae", "text_encoder")}


def assert_same_weights(a, b):
    for component in a:
        assert a[component].keys() == b[component].keys(), component
        for key, value in a[component].items():
            assert torch.equal(value, b[component][key]), f"{component}.{key}"


def config_only(src, dst):
    """A diffusers folder with its configs, tokenizer and scheduler but no weights."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


# ------------------------------------------------------------------------------------------------- export
def test_export_round_trips_through_diffusers_from_single_file(ws, tiny_pipeline_root):
    shutil.copytree(tiny_pipeline_dir("sd1", root=tiny_pipeline_root), ws / "model")
    write_policy(ws, "model")
    result = invoke("apply", "policy.yaml", "--single-file")
    assert result.exit_code == 0, result.output
    checkpoint = ws / "edited" / "edited.safetensors"
    record = json.loads((ws / "edited" / EDIT_RECORD).read_text())["single_file"]
    assert record["file"] == checkpoint.name and record["bytes"] == checkpoint.stat().st_size
    with safe_open(str(checkpoint), framework="pt") as fh:
        keys = set(fh.keys())
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys  # original layout
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys

    config = config_only(ws / "model", ws / "config")
    back = singlefile.load_single_file(checkpoint, config, dtype=torch.float32)
    edited = load_pipeline(ws / "edited")
    assert_same_weights(states(edited), states(back))
    assert open_db().list_runs(1)[0]["stats"]["single_file"] == record


def test_export_keeps_the_stored_dtype(tiny_pipe, tmp_path):
    pipe = tiny_pipe("sd1")
    path = tmp_path / "half.safetensors"
    singlefile.write_single_file(pipe, path, {"unet": torch.float16, "vae": torch.float16, "text_encoder": torch.float16})
    assert modelio._safetensors_dtype([path]) == "float16"


@pytest.mark.parametrize("kind,why", [("sd1-bert", "BertModel"), ("sdxl", "two text encoders"),
                                      ("pixart", "PixArtTransformer2DModel")])
def test_other_architectures_are_refused_in_one_line(tiny_pipe, kind, why):
    with pytest.raises(ModelError) as info:
        singlefile.check_exportable(tiny_pipe(kind))
    line = info.value.one_line()
    assert why in line and "output.single_file" in line and "\n" not in line


# ------------------------------------------------------------------------------------------------ loading
def test_a_single_file_checkpoint_applies_probes_and_is_verified(ws, tiny_pipe, tiny_pipeline_root):
    (ws / "ckpt").mkdir()
    singlefile.write_single_file(tiny_pipe("sd1"), ws / "ckpt" / "tiny.safetensors")
    config_only(tiny_pipeline_dir("sd1", root=tiny_pipeline_root), ws / "sd1-config")
    write_policy(ws, "ckpt/tiny.safetensors", config="sd1-config")
    applied = invoke("apply", "policy.yaml")
    assert applied.exit_code == 0, applied.output
    db = open_db()
    run_id = db.list_runs(1)[0]["id"]
    inputs = {m["role"]: m for m in db.run_models(run_id)}["input"]
    paths = {f["path"] for f in inputs["files"]}
    assert "tiny.safetensors" in paths and "../sd1-config/unet/config.json" in paths  # checkpoint and its configs
    original = tiny_pipe("sd1")
    edited = load_pipeline(ws / "edited")
    changed = [k for k, v in original.unet.state_dict().items() if not torch.equal(v, edited.unet.state_dict()[k])]
    assert changed and all(".attn2.to_" in k for k in changed)

    probed = invoke("probe", run_id)
    assert probed.exit_code == 0, probed.output
    gated = invoke("gate", run_id)
    assert gated.exit_code == 0, gated.output

    config_file = ws / "sd1-config" / "unet" / "config.json"
    config_file.write_text(config_file.read_text().replace('"layers_per_block": 1', '"layers_per_block": 1 '))
    from safeguard.probing import verify_model_files

    with pytest.raises(ModelError, match="sd1-config/unet/config.json differs"):
        verify_model_files(db, inputs, "model.source")


def test_a_single_file_without_config_is_a_policy_error(ws, tiny_pipe):
    singlefile.write_single_file(tiny_pipe("sd1"), ws / "tiny.safetensors")
    write_policy(ws, "tiny.safetensors")
    result = CliRunner().invoke(cli, ["apply", "policy.yaml"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "model.config" in result.output and "policy.yaml" in result.output


# ------------------------------------------------------------------------------------------ hub cache
def fake_hub_cache(root, repo_id, folder):
    """A Hugging Face hub cache holding ``folder`` as the main revision of ``repo_id``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_a_hub_id_loads_offline_from_the_local_cache(ws, tiny_pipeline_root, monkeypatch):
    snapshot = fake_hub_cache(ws / "hub-cache", "tiny-org/tiny-sd", tiny_pipeline_dir("sd1", root=tiny_pipeline_root))
    monkeypatch.setenv("HF_HUB_CACHE", str(ws / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_policy(ws, "tiny-org/tiny-sd")
    result = invoke("apply", "policy.yaml")
    assert result.exit_code == 0, result.output
    db = open_db()
    run_id = db.list_runs(1)[0]["id"]
    inputs = {m["role"]: m for m in db.run_models(run_id)}["input"]
    assert inputs["path"] == str(snapshot.resolve()) and inputs["files"]  # hashed like any local folder
    assert json.loads((ws / "edited" / EDIT_RECORD).read_text())["base_model"]["base_model"] == "tiny-org/tiny-sd"


def test_a_hub_id_missing_from_the_cache_offline_is_one_line(ws, monkeypatch):
    (ws / "hub-cache").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(ws / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_policy(ws, "tiny-org/not-downloaded")
    result = CliRunner().invoke(cli, ["apply", "policy.yaml"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "not in the local Hugging Face cache" in result.output and str(ws / "hub-cache") in result.output
