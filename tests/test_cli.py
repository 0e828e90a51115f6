"""The CLI through click's CliRunner: exact exit codes and outputs; probe/gate plumbing with stand-in judges."""
import json
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import standin_plugins
from fixtures import tiny_policy_text
from safeguard import hookimpl
from safeguard.cli import cli
from safeguard.plugins import pm


@pytest.fixture
def ws(standin_workspace):
    return standin_workspace


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def apply_with(ws, judge):
    (ws / "policy.yaml").write_text(tiny_policy_text("tiny-cli", judge=judge))
    result = invoke("apply", "policy.yaml")
    assert result.exit_code == 0, result.output
    return re.search(r"^run (\S+): wrote", result.stdout, re.M).group(1)


def probe_run_id(result):
    return re.search(r"^probe run (\S+) ", result.stdout, re.M).group(1)


def test_version_and_help():
    assert invoke("--version").output.startswith("safeguard, version ")
    assert "apply" in invoke("--help").output


def test_validate_prints_plan(ws):
    (ws / "policy.yaml").write_text(tiny_policy_text("tiny-cli", judge="always-target"))
    result = invoke("validate", "policy.yaml")
    assert result.exit_code == 0
    assert "policy.yaml: valid (policy 'tiny-cli'" in result.output
    assert "ban 'pikachu' (character): 2 forget anchors" in result.output


def test_bad_policy_is_one_line_exit_1(ws):
    (ws / "bad.yaml").write_text("version: 1\nname: x\nmodel: {source: model}\nconcepts: [{name: a, category: nope}]\n")
    result = CliRunner().invoke(cli, ["validate", "bad.yaml"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith("Error: bad.yaml:4: concepts[0].category:")


@pytest.mark.parametrize("judge,expected,verdict", [
    ("always-target", 10, "FAIL: leakage over threshold (exit 10)"),
    ("never-target", 0, "PASS (exit 0)"),
    ("crashing", 11, "INCOMPLETE EVIDENCE: unassessed probes (exit 11)"),
])
def test_probe_then_gate_exit_codes(ws, judge, expected, verdict):
    run_id = apply_with(ws, judge)
    result = invoke("probe", run_id)
    assert result.exit_code == 0, result.output
    probe_id = probe_run_id(result)
    gate = CliRunner().invoke(cli, ["gate", probe_id, "--junit", "junit.xml"])
    assert gate.exit_code == expected, gate.output
    assert gate.stdout.splitlines()[0] == verdict
    assert (ws / "junit.xml").read_text().startswith("<?xml")
    # the apply run id resolves to its latest probe run
    assert CliRunner().invoke(cli, ["gate", run_id]).exit_code == expected


def test_gate_refuses_model_changed_after_audit(ws):
    run_id = apply_with(ws, "never-target")
    invoke("probe", run_id)
    weights = ws / "edited" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # flip one bit of one weight
    weights.write_bytes(bytes(data))
    gate = CliRunner().invoke(cli, ["gate", run_id])
    assert gate.exit_code == 12
    assert "differs from the audited model" in gate.output


def test_probe_killed_mid_samples_resumes_without_redoing_them(ws):
    import os

    from safeguard.db import open_db

    run_id = apply_with(ws, "never-target")
    # The child process gets the stand-in judge as a one-file plugin.
    plugins_dir = ws / "plugins"
    plugins_dir.mkdir()
    shutil.copy(standin_plugins.__file__, plugins_dir / "judges.py")
    env = {**os.environ, "SAFEGUARD_CRASH_AT": "probe:mid-samples", "SAFEGUARD_PLUGINS_DIR": str(plugins_dir)}
    killed = subprocess.run([sys.executable, "-m", "safeguard", "probe", run_id], env=env, capture_output=True, text=True,
                            cwd=ws)
    assert killed.returncode == -9, killed.stderr[-2000:]
    db = open_db()
    probe_run = db.child_runs(run_id)[-1]
    assert probe_run["status"] == "running"
    recorded = db.samples(probe_run["id"])
    assert recorded, "the kill came after the first batch of samples was committed"
    result = invoke("probe", probe_run["id"], "--resume")
    assert result.exit_code == 0, result.output
    after = db.samples(probe_run["id"])
    kept = {s["id"] for s in recorded}
    assert kept <= {s["id"] for s in after} and len(after) > len(recorded)
    assert len({(s["probe"], s["concept"], s["model_role"], s["prompt"], s["seed"]) for s in after}) == len(after)
    assert db.get_run(probe_run["id"])["status"] == "done"


def test_runs_list_and_show_json(ws):
    run_id = apply_with(ws, "never-target")
    listed = json.loads(invoke("runs", "list", "--json").output)
    assert listed["schema_version"] == 1 and listed["runs"][0]["id"] == run_id
    shown = json.loads(invoke("runs", "show", run_id, "--json").output)
    assert shown["run"]["status"] == "done" and shown["layer_edits"]
    text = invoke("runs", "show", run_id).output
    assert f"run {run_id} (apply, done)" in text


def test_report_writes_html_json_markdown(ws):
    run_id = apply_with(ws, "always-target")
    invoke("probe", run_id)
    result = invoke("report", run_id, "-o", "r.html", "--json", "r.json", "--markdown", "r.md")
    assert result.exit_code == 0, result.output
    html = (ws / "r.html").read_text()
    assert "data:image/png;base64," in html and "pikachu" in html
    assert json.loads((ws / "r.json").read_text())["verdict"]["exit_code"] == 10
    assert "|" in (ws / "r.md").read_text()


def test_audit_verify_after_runs(ws):
    apply_with(ws, "never-target")
    result = invoke("audit", "verify")
    assert result.exit_code == 0 and result.output.startswith("OK: ")


def test_plugins_json_lists_builtins_without_importing_torch():
    code = ("import sys, json; from click.testing import CliRunner; from safeguard.cli import cli; "
            "r = CliRunner().invoke(cli, ['plugins', '--json']); data = json.loads(r.output); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(json.dumps(data))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names = {p["name"]: p for p in json.loads(out)}
    assert "register_erasers" in names["safeguard.builtin.pure"]["hooks"]
    assert names["safeguard.builtin.pure"]["version"]


def test_misspelled_hook_is_rejected():
    import pluggy

    
    class Typo:
        @hookimpl
        def register_eraser(self, register):  # missing "s"
            pass

    pm.register(Typo(), name="typo")
    try:
        with pytest.raises(pluggy.PluginValidationError):
            pm.check_pending()
    finally:
        pm.unregister(name="typo")
