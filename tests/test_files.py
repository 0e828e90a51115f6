"""One definition each: the model tree hash, canonical JSON, atomic writes."""
import hashlib
import json
import os

import pytest

from safeguard.errors import SafeguardError
from safeguard.files import sha256_file, staged_folder, tree_sha256, write_atomically


def test_tree_hash_is_the_recorded_folder_hash_in_path_order(tmp_path):
    from safeguard.db import open_db
    from safeguard.modelio import hash_model_folder

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "unet.json").write_text("[]")  # sorts after unet/ component-wise, before it as plain text
    (tmp_path / "model_index.json").write_text("{}")
    model = hash_model_folder(tmp_path)
    lines = "\n".join(f"{f['path']} {sha256_file(tmp_path / f['path'])}"
                      for f in sorted(model.files, key=lambda f: f["path"].split("/")))
    assert model.tree_sha256 == hashlib.sha256(lines.encode()).hexdigest() == tree_sha256(reversed(model.files))
    db = open_db(f"sqlite:///{tmp_path / 'audit.db'}")
    model_id = db.record_model(str(tmp_path), None, "input", model.files, model.tree_sha256)
    recorded = next(m for m in db.run_models(db.start_run("apply", input_model_id=model_id)) if m["role"] == "input")
    assert recorded["tree_sha256"] == model.tree_sha256 == tree_sha256(recorded["files"])


def test_policy_hash_is_the_canonical_json_the_audit_chain_uses(tmp_path):
    from safeguard.db import canonical_json
    from safeguard.policy import parse_policy_text
    from fixtures import tiny_policy_text

    text = tiny_policy_text("café-policy").replace("the yellow electric mouse", "la souris électrique jaune")
    loaded = parse_policy_text(text, str(tmp_path / "policy.yaml"))
    assert loaded.canonical_json == canonical_json(json.loads(loaded.canonical_json))
    assert "électrique" in loaded.canonical_json and "\\u00e9" not in loaded.canonical_json  # UTF-8, not escapes
    assert loaded.sha256 == hashlib.sha256(loaded.canonical_json.encode("utf-8")).hexdigest()


def test_write_atomically_replaces_whole_files_and_leaves_nothing_beside_them(tmp_path):
    target = tmp_path / "out" / "report.html"
    write_atomically(target, "first")
    write_atomically(target, b"second")
    assert target.read_text() == "second" and os.listdir(target.parent) == ["report.html"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # readable like any file the user writes
    (tmp_path / "dir-in-the-way").mkdir()
    with pytest.raises(SafeguardError) as caught:
        write_atomically(tmp_path / "dir-in-the-way", "x", what="the report")
    assert caught.value.one_line().startswith(f"{tmp_path / 'dir-in-the-way'}: cannot write the report: ")
    assert sorted(os.listdir(tmp_path)) == ["dir-in-the-way", "out"]


def test_staged_folder_is_removed_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError), staged_folder(tmp_path / "bundle") as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
