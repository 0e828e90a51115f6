"""Evidence bundles (`safeguard.export`) and the `audit keygen|sign|verify --public-key|export` commands, on one
apply + probe run of the tiny pipeline with a stand-in judge."""
import json
import os
import re
import shutil
import stat
import subprocess

import pytest
from click.testing import CliRunner

import standin_plugins
from safeguard.integrity import generate_signing_key, key_id, verify_signature
from safeguard.cli import cli
from safeguard.db import GENESIS_HASH, event_row_hash, open_db
from safeguard.export import BUNDLE_FILES, MANIFEST, export_bundle, verify_manifest
from safeguard.modelio import hash_model_folder
from safeguard.plugins import pm

# CRLF line ends, a comment, non-ASCII text and trailing spaces: the bundle must keep every byte.
POLICY = (
    "# tiny export policy — café ✓\r\n"
    "version: 1\r\n"
    "name: tiny-export   \r\n"
    "model:\r\n  source: model\r\n"
    "eraser:\r\n  name: pure\r\n  params: {steps: 2, seeds: 1}\r\n"
    "concepts:\r\n"
    "  - name: pikachu\r\n    category: character\r\n"
    "    forget_anchors: [a photo of pikachu, pikachu in a garden]\r\n"
    "    neighbours: [mario]\r\n"
    "probes:\r\n  kinds: [canonical]\r\n  images_per_prompt: 1\r\n  steps: 2\r\n  max_prompts: 2\r\n"
    "thresholds:\r\n  max_leakage: 0.8\r\n"
    "judge:\r\n  name: never-target\r\n  checkpoint: none\r\n"
    "output:\r\n  dir: edited\r\n"
).encode("utf-8")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_pipeline_root):
    """A workspace whose database holds one apply run and its probe run: (folder, db url, apply run id)."""
    from fixtures import tiny_pipeline_dir

    root = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), root / "model")
    (root / "policy.yaml").write_bytes(POLICY)
    url = f"sqlite:///{root / 'audit.db'}"
    pm.register(standin_plugins, name="export-test-judges")
    try:
        applied = invoke("apply", root / "policy.yaml", "--db", url)
        assert applied.exit_code == 0, applied.output
        run_id = re.search(r"^run (\S+): wrote", applied.stdout, re.M).group(1)
        probed = invoke("probe", run_id, "--db", url)
        assert probed.exit_code == 0, probed.output
    finally:
        pm.unregister(name="export-test-judges")
    return root, url, run_id


def test_bundle_has_every_file_and_a_manifest_that_verifies(audited, tmp_path):
    root, url, run_id = audited
    bundle = export_bundle(open_db(url), run_id, tmp_path / "bundle")
    assert sorted(p.name for p in bundle.iterdir()) == sorted(BUNDLE_FILES)
    assert verify_manifest(bundle) == []
    if shutil.which("sha256sum"):  # the format is sha256sum's own
        subprocess.run(["sha256sum", "--check", "--quiet", MANIFEST], cwd=bundle, check=True)
    assert not list(tmp_path.glob(".bundle.partial-*"))
    assert (bundle / "policy.yaml").read_bytes() == POLICY
    report = json.loads((bundle / "report.json").read_text())
    assert report["apply_run"]["id"] == run_id and report["verdict"]["verdict"]
    assert json.loads((bundle / "policy.canonical.json").read_text())["name"] == "tiny-export"
    assert "pikachu" in (bundle / "report.html").read_text() and "|" in (bundle / "summary.md").read_text()


def test_bundle_records_hashes_environment_and_the_whole_chain(audited, tmp_path):
    root, url, run_id = audited
    db = open_db(url)
    bundle = export_bundle(db, run_id, tmp_path / "bundle")
    hashes = json.loads((bundle / "hashes.json").read_text())
    assert hashes["output"]["tree_sha256"] == db.run_as_dict(run_id)["output_model"]["tree_sha256"]
    on_disk = {f["path"]: f["sha256"] for f in hash_model_folder(root / "model").files}
    assert {f["path"]: f["sha256"] for f in hashes["input"]["files"]} == on_disk
    runs = json.loads((bundle / "environment.json").read_text())["runs"]
    assert [r["kind"] for r in runs] == ["apply", "probe"] and runs[0]["id"] == run_id
    assert all(r["argv"] and r["versions"]["torch"] and r["user"] and r["host"] for r in runs)
    head = json.loads((bundle / "chain_head.json").read_text())
    assert relinked_head(bundle, head["seq"]) == head["row_hash"]


def relinked_head(bundle, seq):
    """Recompute the chain from the exported events alone, as an auditor without the database would."""
    prev = GENESIS_HASH
    for line in (bundle / "audit_events.jsonl").read_text().splitlines():
        event = json.loads(line)
        assert event["prev_hash"] == prev
        prev = event_row_hash(prev, event["seq"], event["run_id"], event["event"], event["payload"],
                              event["created_at"])
        assert prev == event["row_hash"]
        if event["seq"] == seq:
            return prev
    raise AssertionError(f"event {seq} is not in the bundle")


def test_signed_head_verifies_and_one_changed_byte_breaks_it(audited, tmp_path):
    root, url, run_id = audited
    private, public = generate_signing_key()
    bundle = export_bundle(open_db(url), run_id, tmp_path / "bundle", key_bytes=private)
    raw = (bundle / "chain_head.json").read_bytes()
    head = json.loads(raw)
    assert head["public_key"] == public.hex() and head["key_id"] == key_id(public)
    assert verify_signature(head, public)
    assert relinked_head(bundle, head["seq"]) == head["row_hash"]
    position = raw.index(head["row_hash"].encode()) + 5
    changed = raw[:position] + (b"0" if raw[position:position + 1] != b"0" else b"1") + raw[position + 1:]
    assert not verify_signature(json.loads(changed), public)
    assert not verify_signature(head, generate_signing_key()[1])


def test_manifest_catches_a_changed_file(audited, tmp_path):
    root, url, run_id = audited
    bundle = export_bundle(open_db(url), run_id, tmp_path / "bundle")
    with open(bundle / "hashes.json", "ab") as fh:
        fh.write(b" ")
    assert verify_manifest(bundle) == ["hashes.json: sha256 differs from the manifest"]


def test_keygen_sign_verify_and_export_commands(audited, tmp_path):
    root, url, run_id = audited
    key = tmp_path / "keys" / "audit.key"
    made = invoke("audit", "keygen", "--out", key)
    assert made.exit_code == 0, made.output
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    public = bytes.fromhex((tmp_path / "keys" / "audit.key.pub").read_text())
    assert key_id(public) in made.output
    assert invoke("audit", "keygen", "--out", key).exit_code == 1  # never overwrites a key

    unsigned = invoke("audit", "verify", "--db", url, "--public-key", f"{key}.pub")
    assert unsigned.exit_code == 1 and "no head in the chain is signed" in unsigned.output

    signed = invoke("audit", "sign", "--db", url, "--key", key)
    assert signed.exit_code == 0, signed.output
    seq, row_hash = open_db(url).head()
    assert key_id(public) in signed.output and f"seq {seq - 1} " in signed.output

    verified = invoke("audit", "verify", "--db", url, "--public-key", f"{key}.pub")
    assert verified.exit_code == 0 and verified.output.startswith("OK: "), verified.output
    other = tmp_path / "other.key"
    assert invoke("audit", "keygen", "--out", other).exit_code == 0
    assert invoke("audit", "verify", "--db", url, "--public-key", f"{other}.pub").exit_code == 1

    exported = invoke("audit", "export", run_id, "--db", url, "--out", tmp_path / "bundle", "--key", key)
    assert exported.exit_code == 0, exported.output
    assert verify_manifest(tmp_path / "bundle") == []
    assert verify_signature(json.loads((tmp_path / "bundle" / "chain_head.json").read_text()), public)
    again = invoke("audit", "export", run_id, "--db", url, "--out", tmp_path / "bundle")
    assert again.exit_code == 1 and "already exists" in again.output
    missing = invoke("audit", "export", "NO-SUCH-RUN", "--db", url, "--out", tmp_path / "other-bundle")
    assert missing.exit_code == 1 and not (tmp_path / "other-bundle").exists()
    assert invoke("audit", "verify", "--db", url).exit_code == 0
