"""The edited model's Hugging Face card: written by apply ("not yet probed"), rewritten by each recorded verdict,
never part of the audited model hash."""
import json
import re

import pytest
import yaml
from click.testing import CliRunner

from fixtures import tiny_policy_text
from safeguard import modelcard
from safeguard.cli import cli
from safeguard.db import open_db
from safeguard.modelio import EDIT_RECORD, hash_model_folder


@pytest.fixture
def ws(standin_workspace):
    return standin_workspace


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def apply(ws, judge="never-target"):
    (ws / "policy.yaml").write_text(tiny_policy_text("tiny-card", judge=judge))
    result = invoke("apply", "policy.yaml")
    assert result.exit_code == 0, result.output
    return re.search(r"^run (\S+): wrote", result.stdout, re.M).group(1)


def card(ws):
    text = (ws / "edited" / "README.md").read_text()
    head, _, body = text.removeprefix("---\n").partition("\n---\n")
    return yaml.safe_load(head), body


def test_apply_writes_a_card_that_names_what_how_and_the_policy(ws):
    run_id = apply(ws)
    meta, body = card(ws)
    record = json.loads((ws / "edited" / EDIT_RECORD).read_text())
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"safeguard", "concept-erasure", "eraser-pure", "erased-character"} <= set(meta["tags"])
    assert "license" not in meta and "base_model" not in meta  # a local folder without a card declares neither
    assert "| pikachu | character | 2 | mario |" in body
    assert "`pure`" in body and '"steps": 2' in body
    # how the eraser's defaults were chosen travels with the model
    assert "Why the eraser's defaults are what they are: the paper's form" in body
    assert record["eraser_defaults_evidence"].startswith("the paper's form")
    assert record["policy_sha256"] in body and run_id in body
    assert "Not yet probed" in body
    assert "README.md" not in {f["path"] for f in open_db().run_as_dict(run_id)["output_model"]["files"]}


def test_each_recorded_verdict_rewrites_the_card_and_the_model_still_verifies(ws):
    run_id = apply(ws, judge="always-target")
    hashed = hash_model_folder(ws / "edited").tree_sha256
    probe = invoke("probe", run_id)
    assert probe.exit_code == 0, probe.output
    first = invoke("gate", run_id)
    assert first.exit_code == 10, first.output
    _, body = card(ws)
    probe_id = re.search(r"^probe run (\S+) ", probe.stdout, re.M).group(1)
    assert "**FAIL: leakage over threshold (exit 10)**" in body and probe_id in body
    assert "Not yet probed" not in body and "pikachu" in body.split("## Verdict")[1]
    # The card changed on disk, the audited model did not: the next gate is not "model changed".
    assert hash_model_folder(ws / "edited").tree_sha256 == hashed
    again = invoke("gate", run_id)
    assert again.exit_code == 10, again.output
    assert not list((ws / "edited").glob(".README.md.partial"))


def test_a_card_of_a_later_apply_is_left_alone(ws):
    first = apply(ws)
    invoke("probe", first)
    apply(ws)  # the same output folder now holds another run's edit
    before = (ws / "edited" / "README.md").read_text()
    assert invoke("gate", first).exit_code == 12  # the folder is not the model the first run audited
    assert (ws / "edited" / "README.md").read_text() == before and "Not yet probed" in before


def test_license_and_base_model_come_from_the_input_card(ws):
    (ws / "model" / "README.md").write_text("---\nlicense: creativeml-openrail-m\nbase_model: org/base-model\n---\n# base\n")
    apply(ws)
    meta, _ = card(ws)
    assert meta["license"] == "creativeml-openrail-m" and meta["base_model"] == "org/base-model"


def test_a_hub_id_is_its_own_base_model():
    info = modelcard.base_model_info("stable-diffusion-v1-5/stable-diffusion-v1-5", None)
    assert info["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
