"""The stage functions as a library: apply, probe, gate, report and the one-shot audit, called the way the CLI
and bench/ call them, on a tiny pipeline with stand-in judges."""
import json
import subprocess
import sys

import pytest

from fixtures import tiny_policy_text
from safeguard.plugins import pm


@pytest.fixture
def ws(standin_workspace):
    return standin_workspace


def loaded_policy(ws, judge: str, **fields):
    from safeguard.policy import load_policy

    (ws / "policy.yaml").write_text(tiny_policy_text("tiny-stages", judge=judge, **fields))
    return load_policy(ws / "policy.yaml")


def test_import_safeguard_exposes_the_stages_without_importing_torch():
    code = ("import sys, safeguard; names = safeguard._STAGE_FUNCTIONS; "
            "assert all(callable(getattr(safeguard, n)) for n in names); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "6"


def test_stages_one_by_one_record_a_run_each_and_write_the_report(ws):
    from safeguard import apply_policy, gate_run, probe_run, report_run
    from safeguard.db import open_db

    heard = []
    applied = apply_policy(loaded_policy(ws, "always-target"), echo=heard.append)
    db = open_db()
    probed = probe_run(db, applied.run_id, echo=heard.append)
    assert probed.apply_run_id == applied.run_id
    decision, probe_row = gate_run(db, applied.run_id, junit=ws / "ci" / "junit.xml")
    assert probe_row["id"] == probed.run_id and decision.verdict == "fail" and int(decision.exit_code) == 10
    assert (ws / "ci" / "junit.xml").read_text().startswith("<?xml")
    assert [d["verdict"] for d in db.gate_decisions(probed.run_id)] == ["fail"]
    report = report_run(db, probed.run_id, html=ws / "r.html", json=ws / "r.json", markdown=ws / "r.md")
    assert report.written == [ws / "r.html", ws / "r.json", ws / "r.md"]
    assert json.loads((ws / "r.json").read_text())["verdict"]["exit_code"] == 10
    assert "data:image/png;base64," in (ws / "r.html").read_text()
    kinds = [r["kind"] for r in db.list_runs(None)]
    assert sorted(kinds) == ["apply", "probe"]
    assert any("probing 1 concept(s)" in line for line in heard)


def test_report_run_without_paths_writes_html_named_after_the_probe_run(ws):
    from safeguard import apply_policy, probe_run, report_run
    from safeguard.db import open_db

    applied = apply_policy(loaded_policy(ws, "never-target"), echo=lambda m: None)
    db = open_db()
    probed = probe_run(db, applied.run_id, echo=lambda m: None)
    report = report_run(db, applied.run_id)
    assert [p.resolve() for p in report.written] == [ws / f"report-{probed.run_id}.html"]
    assert report.verdict == "pass"


def test_audit_policy_runs_every_stage_and_writes_the_report_beside_the_output(ws):
    from safeguard import audit_policy
    from safeguard.db import open_db

    audited = audit_policy(loaded_policy(ws, "never-target", out="out/edited"), echo=lambda m: None)
    assert audited.decision.verdict == "pass"
    assert audited.report.written == [ws / "out" / "report-tiny-stages.html", ws / "out" / "report-tiny-stages.md"]
    assert all(p.is_file() for p in audited.report.written)
    run = open_db().get_run(audited.probed.run_id)
    assert run["parent_run_id"] == audited.applied.run_id and run["status"] == "done"


def test_gate_names_a_run_that_is_neither_apply_nor_probe(ws):
    from safeguard import gate_run
    from safeguard.db import open_db
    from safeguard.errors import AuditError

    db = open_db()
    other = db.start_run("revert")
    with pytest.raises(AuditError, match=f"run {other} is a revert run, not an apply or probe run"):
        gate_run(db, other)


# --- the activation screen: a probe plugin of kind "screen" that reads the other probes' samples ----------------
def test_activation_screen_probe_reads_the_saved_bases_and_the_recorded_samples(ws):
    from safeguard import apply_policy, gate_run, probe_run, report_data
    from safeguard.db import open_db

    loaded_policy(ws, "always-target")
    policy_text = (ws / "policy.yaml").read_text().replace("kinds: [canonical, paraphrase]",
                                                           "kinds: [canonical, paraphrase, activation]")
    (ws / "policy.yaml").write_text(policy_text)
    from safeguard.policy import load_policy

    loaded = load_policy(ws / "policy.yaml")
    applied = apply_policy(loaded, echo=lambda m: None)
    assert (ws / "edited" / "safeguard_bases.safetensors").is_file()
    db = open_db()
    probed = probe_run(db, applied.run_id, echo=lambda m: None)
    (screen,) = [r for r in db.probe_results(probed.run_id) if r["probe"] == "activation"]
    prompts = {s["prompt"] for s in db.samples(probed.run_id) if s["model_role"] == "edited"}
    assert screen["concept"] == "*" and screen["details"]["kind"] == "screen"
    assert {r["prompt"] for r in screen["details"]["rows"]} == prompts
    assert all(0.0 <= r["edited_share"] <= 1.0 for r in screen["details"]["rows"])
    # every image is a hit for this judge, so agreement cannot be measured: unassessed, and not gated
    assert screen["status"] == "unassessed" and "hits and misses" in screen["details"]["note"]
    data = report_data(db, probed.run_id)
    assert len(data["activation_screen"]["rows"]) == len(prompts)
    assert all(p["probe"] != "activation" for c in data["concepts"] for p in c["probes"])
    decision, _ = gate_run(db, probed.run_id)
    assert decision.verdict == "fail"  # decided by the leaking target probes alone


def test_a_screen_probe_without_bases_or_that_raises_is_unassessed_naming_why(ws):
    from safeguard import hookimpl
    from safeguard.contracts import SCREEN_KIND
    from safeguard.db import open_db
    from safeguard.engine import apply_policy
    from safeguard.stages.probe import probe_run

    class BrokenScreen:
        name, kind = "broken_screen", SCREEN_KIND

        def screen(self, ctx, samples):
            raise RuntimeError(f"looked at {len(samples)} samples")

    class Plugin:
        @hookimpl
        def register_probes(self, register):
            register(BrokenScreen)

    (ws / "policy.yaml").write_text(tiny_policy_text("tiny-stages", eraser="uce", params="{}", judge="never-target")
                                    .replace("kinds: [canonical, paraphrase]", "kinds: [canonical, activation, broken_screen]"))
    from safeguard.policy import load_policy

    applied = apply_policy(load_policy(ws / "policy.yaml"), echo=lambda m: None)
    pm.register(Plugin(), name="broken-screen")
    try:
        db = open_db()
        probed = probe_run(db, applied.run_id, echo=lambda m: None)
    finally:
        pm.unregister(name="broken-screen")
    results = {r["probe"]: r for r in db.probe_results(probed.run_id)}
    assert results["activation"]["status"] == "unassessed"
    assert results["activation"]["details"]["error"] == "the eraser saved no activation bases with the edit"
    broken = results["broken_screen"]["details"]["error"]
    assert results["broken_screen"]["status"] == "unassessed"
    assert broken.startswith("RuntimeError in plugin broken-screen: looked at ") and broken.endswith(" samples")
    assert results["canonical"]["status"] == "pass"


def test_a_screen_probe_must_implement_screen():
    from safeguard.contracts import SCREEN_KIND, contract_gaps

    class CasesOnly:
        name, kind = "cases_only", SCREEN_KIND

        def cases(self, ctx, concept):
            return None

    assert contract_gaps("probe", CasesOnly) == ["a method screen(self, ctx, samples)"]


# --- output.evidence_dir ---------------------------------------------------------------------------------------
def test_probe_images_go_to_output_evidence_dir_and_the_report_reads_them_there(ws):
    from safeguard import apply_policy, probe_run, report_run
    from safeguard.db import open_db
    from safeguard.policy import load_policy

    loaded_policy(ws, "always-target")
    text = (ws / "policy.yaml").read_text().replace("output:\n  dir: edited\n",
                                                    "output:\n  dir: edited\n  evidence_dir: proof/images\n")
    (ws / "policy.yaml").write_text(text)
    applied = apply_policy(load_policy(ws / "policy.yaml"), echo=lambda m: None)
    db = open_db()
    probed = probe_run(db, applied.run_id, echo=lambda m: None)
    assert probed.evidence_dir == ws / "proof" / "images"
    samples = db.samples(probed.run_id)
    assert samples and all((ws / "proof" / "images" / s["image_path"]).is_file() for s in samples)
    assert not list(db.evidence_dir().rglob("*.png")), "nothing in the database's own evidence folder"
    assert db.get_run(probed.run_id)["stats"]["evidence_dir"] == str(ws / "proof" / "images")
    html = report_run(db, probed.run_id, html=ws / "r.html").written[0].read_text()
    assert html.count("data:image/png;base64,") >= len(samples) and "evidence image missing" not in html


def test_an_evidence_dir_outside_the_allowed_folders_is_refused_naming_the_field(ws, tmp_path_factory):
    from safeguard import apply_policy, probe_run
    from safeguard.db import open_db
    from safeguard.errors import PolicyError
    from safeguard.policy import load_policy

    elsewhere = tmp_path_factory.mktemp("elsewhere")
    loaded_policy(ws, "never-target")
    text = (ws / "policy.yaml").read_text().replace("output:\n  dir: edited\n",
                                                    f"output:\n  dir: edited\n  evidence_dir: {elsewhere}\n")
    (ws / "policy.yaml").write_text(text)
    applied = apply_policy(load_policy(ws / "policy.yaml"), echo=lambda m: None)
    with pytest.raises(PolicyError, match="output.evidence_dir"):
        probe_run(open_db(), applied.run_id, echo=lambda m: None)


# --- provenance and the recorded policy hash -------------------------------------------------------------------
def test_each_run_records_versions_and_user_once_and_the_report_shows_the_recorded_policy_hash(ws):
    from sqlalchemy import update

    from safeguard import apply_policy, probe_run, report_data
    from safeguard.db import Run, open_db
    from safeguard.provenance import actor, collect_versions

    applied = apply_policy(loaded_policy(ws, "never-target"), echo=lambda m: None)
    db = open_db()
    probed = probe_run(db, applied.run_id, echo=lambda m: None)
    for run_id in (applied.run_id, probed.run_id):
        run = db.get_run(run_id)
        assert run["versions"] == collect_versions() and (run["user"], run["host"]) == tuple(actor().values())
    recorded = db.get_run(applied.run_id)["policy_sha256"]
    assert report_data(db, probed.run_id)["policy"]["sha256"] == recorded
    with db.session() as session:  # the report repeats what was recorded, whatever the text hashes to today
        session.execute(update(Run).where(Run.id == applied.run_id).values(policy_sha256="f" * 64))
    assert report_data(db, probed.run_id)["policy"]["sha256"] == "f" * 64
