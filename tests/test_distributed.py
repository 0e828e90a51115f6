"""Data-parallel probing: `accelerate launch` with two CPU processes (gloo) records the same evidence as one
process, a launch killed mid-run is completed by `probe --resume`, and samples another process finished are
merged from its pending file."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from fixtures import tiny_policy_text
from test_crash_safety import CHILD_TIMEOUT_S, apply_here, make_workspace

# Three seeds per prompt and round in batches of two: each round and model is several units, so both
# processes render, and the last step of a round leaves one of them idle.
PROBES = "  images_per_prompt: 3\n  batch_size: 2\n  max_images: 12\n"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from fixtures import tiny_pipeline_dir

    root = tmp_path_factory.mktemp("distributed")
    ws = make_workspace(root / "ws", tiny_pipeline_dir("sd1", root / "tiny"))
    text = tiny_policy_text("distributed", judge="pixel").replace("  images_per_prompt: 1\n", PROBES)
    text = text.replace("max_leakage: 0.8", "max_leakage: 0.5")  # undecided after one round: several rounds
    ws.policy.write_text(text)
    ws.apply_run = apply_here(ws)
    return ws


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(ws, *args: str, processes: int, crash_at: str | None = None) -> subprocess.CompletedProcess:
    """`python -m safeguard ...` (one process) or `accelerate launch` of it on CPU processes."""
    command = [sys.executable, "-m", "safeguard", "--device", "cpu", *args]
    if processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), "-m", "safeguard", "--device", "cpu", *args]
    return subprocess.run(command, cwd=ws.root, env=ws.child_env(crash_at), capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)


def _probe_run(result) -> str:
    line = next(line for line in result.stdout.splitlines() if line.startswith("probe run "))
    return line.split()[2]


def _evidence(db, probe_run: str) -> tuple[list, list]:
    """The recorded samples (in recording order) and results, without ids, run ids and timestamps."""
    samples = [(s["probe"], s["concept"], s["model_role"], s["prompt"], s["seed"], s["image_path"], s["image_sha256"],
                s["label"], json.dumps(s["scores"], sort_keys=True)) for s in db.samples(probe_run)]
    results = []
    for r in db.probe_results(probe_run):
        details = {k: v for k, v in (r["details"] or {}).items() if k != "seconds"}
        results.append((r["probe"], r["concept"], r["status"], r["n"], r["hits"], r["rate"], r["ci_low"], r["ci_high"],
                        r["threshold"], json.dumps(details, sort_keys=True)))
    return samples, sorted(results)


def test_two_processes_record_the_evidence_of_one(ws):
    from safeguard.db import open_db

    one = _launch(ws, "probe", ws.apply_run, processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch(ws, "probe", ws.apply_run, processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "by 2 processes" in two.stdout, two.stdout
    db = open_db(ws.db_url)
    single, shared = _evidence(db, _probe_run(one)), _evidence(db, _probe_run(two))
    assert single[0] and single[1]
    assert len({s[4] for s in single[0]}) > 3, "the probes rendered more than one round of seeds"
    assert len({s[7] for s in single[0]}) > 1, "the judge's verdicts differ between images"
    assert shared == single
    assert db.get_run(_probe_run(two))["stats"]["processes"] == 2


def test_a_killed_launch_is_completed_by_resume(ws):
    from safeguard.db import open_db

    reference = _launch(ws, "probe", ws.apply_run, processes=1)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = _launch(ws, "probe", ws.apply_run, processes=2, crash_at="probe:mid-samples")
    assert killed.returncode != 0
    db = open_db(ws.db_url)
    probe_run = db.child_runs(ws.apply_run)[-1]
    assert probe_run["status"] == "running"
    before = {(s["probe"], s["concept"], s["model_role"], s["prompt"], s["seed"]): s["id"] for s in db.samples(probe_run["id"])}
    assert before, "the first model's samples of the first round were recorded before the kill"
    resumed = _launch(ws, "probe", probe_run["id"], "--resume", processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = db.samples(probe_run["id"])
    assert all(before[k] == s["id"] for s in after if (k := (s["probe"], s["concept"], s["model_role"], s["prompt"], s["seed"])) in before)
    got, want = _evidence(db, probe_run["id"]), _evidence(db, _probe_run(reference))
    assert sorted(got[0]) == sorted(want[0]) and got[1] == want[1]


def test_pending_samples_of_another_process_are_merged_once(tmp_path):
    from safeguard.db import open_db
    from safeguard.distributed import _spool, merge_pending
    from safeguard.probing import image_path

    import hashlib

    db = open_db(f"sqlite:///{tmp_path / 'audit.db'}")
    run_id = db.start_run(kind="probe")
    evidence = db.evidence_dir()

    def pair(seed: int, png: bytes):
        digest = hashlib.sha256(png).hexdigest()
        return (dict(probe="canonical", concept="pikachu", model_role="edited", prompt="a photo of pikachu", seed=seed,
                     image_path=image_path(digest), image_sha256=digest, label="pikachu", scores={"hit": True}), png)

    kept = _spool([pair(1, b"first image"), pair(2, b"second image")], evidence, run_id, rank=1)
    damaged = _spool([pair(3, b"third image")], evidence, run_id, rank=1)
    (evidence / json.loads(damaged.read_text())[0]["image_path"]).write_bytes(b"not the recorded image")
    assert merge_pending(db, run_id, evidence) == 2
    assert sorted(s["seed"] for s in db.samples(run_id)) == [1, 2]
    assert not kept.exists() and not damaged.exists()
    assert merge_pending(db, run_id, evidence) == 0
