"""`safeguard apply` end to end on tiny pipelines: edited folder, audit record, revert, lineage, bad input."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from safeguard.cli import cli
from safeguard.db import open_db
from safeguard.engine import apply_policy
from safeguard.errors import ModelError, PolicyError
from safeguard.modelio import EDIT_RECORD, hash_model_folder, load_pipeline
from safeguard.policy import load_policy

POLICY = """\
version: 1
name: tiny
model:
  source: {source}
eraser:
  name: {eraser}
  params: {params}
concepts:
  - name: pikachu
    category: character
    forget_anchors: [a photo of pikachu, pikachu in a garden, a pikachu toy]
    neighbours: [mario]
    neighbour_anchors:
      mario: [a photo of mario, mario in a garden]
keep: [a photo of a cat]
output:
  dir: {out}
"""


@pytest.fixture
def workspace(tmp_path, tiny_pipeline_root, monkeypatch):
    from fixtures import tiny_pipeline_dir

    src = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), src)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEGUARD_DB", f"sqlite:///{tmp_path}/audit.db")
    return tmp_path


def write_policy(ws, eraser="pure", params="{steps: 2, seeds: 1}", source="model", out="edited", name="policy.yaml"):
    path = ws / name
    path.write_text(POLICY.format(source=source, eraser=eraser, params=params, out=out))
    return path


def denoiser_tensors(folder):
    return load_pipeline(Path(folder)).unet.state_dict()


@pytest.mark.parametrize("eraser", ["pure", "uce"])
def test_apply_writes_loadable_model_and_complete_record(workspace, eraser):
    params = "{steps: 2, seeds: 1}" if eraser == "pure" else "{}"
    outcome = apply_policy(load_policy(write_policy(workspace, eraser, params)), echo=lambda m: None)
    out = workspace / "edited"
    assert (out / "model_index.json").exists() and (out / EDIT_RECORD).exists()
    assert not list(out.rglob("*.bin")), "safetensors only"
    assert not list(workspace.glob(".edited.partial-*"))
    before, after = denoiser_tensors(workspace / "model"), denoiser_tensors(out)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.endswith(("to_k.weight", "to_v.weight")) and ".attn2." in k for k in changed)
    data = open_db().run_as_dict(outcome.run_id)
    run = data["run"]
    assert run["status"] == "done" and run["eraser_name"] == eraser and run["policy_sha256"]
    output_model = data["output_model"]
    assert data["input_model"]["tree_sha256"] == hash_model_folder(workspace / "model").tree_sha256
    assert output_model["tree_sha256"] == hash_model_folder(out).tree_sha256
    assert len(data["layer_edits"]) == len([k for k in changed if k.endswith("to_k.weight")])
    assert data["concept_edits"][0]["concept"] == "pikachu"
    for key in ("torch", "diffusers", "transformers", "safeguard"):
        assert run["versions"][key]


def test_pure_stats_are_recorded_per_layer(workspace):
    outcome = apply_policy(load_policy(write_policy(workspace)), echo=lambda m: None)
    for layer in outcome.layers:
        for key in ("rank_forget", "rank_retain", "variance_kept_forget", "delta_norm_k", "delta_norm_v", "rows_forget", "seconds"):
            assert key in layer.stats
    assert outcome.stats["seconds"] > 0


def test_revert_restores_original_bit_for_bit(workspace):
    apply_policy(load_policy(write_policy(workspace)), echo=lambda m: None)
    result = CliRunner().invoke(cli, ["revert", "edited", "--out", "restored"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    original, restored = denoiser_tensors(workspace / "model"), denoiser_tensors(workspace / "restored")
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    unet = "unet/diffusion_pytorch_model.safetensors"
    sha = lambda folder: next(f["sha256"] for f in hash_model_folder(folder).files if f["path"] == unet)  # noqa: E731
    assert sha(workspace / "model") == sha(workspace / "restored")


def test_revert_is_recorded_as_a_run_with_both_models_hashes(workspace):
    applied = apply_policy(load_policy(write_policy(workspace)), echo=lambda m: None)
    result = CliRunner().invoke(cli, ["revert", "edited", "--out", "restored"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    db = open_db()
    (revert_run,) = db.list_runs(None, kind="revert")
    assert result.output.startswith(f"run {revert_run['id']}: restored the original tensors into ")
    data = db.run_as_dict(revert_run["id"])
    assert data["run"]["status"] == "done" and data["run"]["parent_run_id"] == applied.run_id
    assert data["run"]["policy_sha256"] == db.get_run(applied.run_id)["policy_sha256"]
    assert data["input_model"]["tree_sha256"] == hash_model_folder(workspace / "edited").tree_sha256
    assert data["output_model"]["tree_sha256"] == hash_model_folder(workspace / "restored").tree_sha256
    assert data["output_model"]["path"] == str(workspace / "restored")
    from safeguard.integrity import verify_chain

    assert verify_chain(db).ok


def test_a_failed_revert_is_recorded_as_failed(workspace):
    shutil.copytree(workspace / "model", workspace / "plain")
    result = CliRunner().invoke(cli, ["revert", "plain", "--out", "restored"])
    assert result.exit_code == 1 and "not an edited model" in result.output
    (revert_run,) = open_db().list_runs(None, kind="revert")
    assert revert_run["status"] == "failed" and "not an edited model" in revert_run["error"]
    assert not (workspace / "restored").exists()


def test_revert_removes_leftovers_of_a_killed_write(workspace):
    apply_policy(load_policy(write_policy(workspace)), echo=lambda m: None)
    leftover = workspace / ".restored.partial-killed"
    leftover.mkdir()
    (leftover / "model_index.json").write_text("{}")
    result = CliRunner().invoke(cli, ["revert", "edited", "--out", "restored"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not leftover.exists() and (workspace / "restored" / "model_index.json").exists()


def test_second_policy_on_edited_model_records_lineage(workspace):
    first = apply_policy(load_policy(write_policy(workspace)), echo=lambda m: None)
    second_policy = write_policy(workspace, source="edited", out="edited-v2", name="v2.yaml")
    second = apply_policy(load_policy(second_policy), echo=lambda m: None)
    record = json.loads((workspace / "edited-v2" / EDIT_RECORD).read_text())
    assert [step["run_id"] for step in record["lineage"]] == [first.run_id, second.run_id]
    run = open_db().get_run(second.run_id)
    assert run["parent_run_id"] == first.run_id


def test_dry_run_writes_nothing(workspace):
    result = CliRunner().invoke(cli, ["apply", str(write_policy(workspace)), "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 0 and "dry run" in result.output
    assert not (workspace / "edited").exists() and not (workspace / "audit.db").exists()


def test_rerun_replaces_own_output_but_never_foreign_folder(workspace):
    policy = load_policy(write_policy(workspace))
    apply_policy(policy, echo=lambda m: None)
    apply_policy(policy, echo=lambda m: None)  # idempotent re-run over its own output
    foreign = workspace / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(ModelError, match="was not written by safeguard"):
        apply_policy(load_policy(write_policy(workspace, out="foreign", name="f.yaml")), echo=lambda m: None)
    assert (foreign / "keep.txt").read_text() == "user data"


def _runs(status=None):
    return [r for r in open_db().list_runs(100) if status is None or r["status"] == status]


@pytest.mark.parametrize("damage,message", [
    ("pickle", "only pickle weights"),
    ("corrupt", "corrupt or truncated"),
    ("no_index", "model_index.json is missing"),
    ("no_component", "is missing"),
])
def test_bad_models_give_clear_error_and_leave_nothing(workspace, damage, message):
    model = workspace / "model"
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "pickle":
        torch.save(torch.nn.Linear(1, 1).state_dict(), model / "unet" / "diffusion_pytorch_model.bin")
        weights.unlink()
    elif damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "no_index":
        (model / "model_index.json").unlink()
    else:
        shutil.rmtree(model / "vae")
    result = CliRunner().invoke(cli, ["apply", str(write_policy(workspace))])
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: ") and message in line and "fix:" in line
    assert not (workspace / "edited").exists()
    assert not list(workspace.glob(".edited.*"))
    assert all(r["status"] == "failed" for r in _runs()), "a refused model leaves only failed runs, never half rows"


def test_pickle_allowed_with_explicit_flag(workspace):
    model = workspace / "model"
    unet = load_pipeline(model).unet
    torch.save(unet.state_dict(), model / "unet" / "diffusion_pytorch_model.bin")
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    result = CliRunner().invoke(cli, ["apply", str(write_policy(workspace)), "--allow-pickle"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (workspace / "edited" / "unet" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.parametrize("eraser,params,field", [
    ("nonexistent", "{}", "eraser.name"),
    ("pure", "{tau: 0}", "eraser.params.tau"),
    ("pure", "{tau: 1.5}", "eraser.params.tau"),
    ("pure", "{steps: 0}", "eraser.params.steps"),
    ("pure", "{colour: red}", "eraser.params.colour"),
    ("uce", "{lam: -1}", "eraser.params.lam"),
])
def test_bad_eraser_settings(workspace, eraser, params, field):
    with pytest.raises(PolicyError) as info:
        apply_policy(load_policy(write_policy(workspace, eraser, params)), echo=lambda m: None)
    assert field in info.value.one_line() and "policy.yaml" in info.value.one_line()
    assert not (workspace / "audit.db").exists() or not _runs()


def test_unwritable_output_location_is_a_clear_error(workspace):
    (workspace / "afile").write_text("not a folder")
    with pytest.raises(ModelError) as info:
        apply_policy(load_policy(write_policy(workspace, out="afile/edited")), echo=lambda m: None)
    assert "output.dir" in info.value.one_line() and "fix:" in info.value.one_line()
    assert (workspace / "afile").read_text() == "not a folder"
    assert [r["status"] for r in _runs()] == ["failed"]
