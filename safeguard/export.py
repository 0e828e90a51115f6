"""Evidence bundles and signing keys: everything an auditor needs about one run, in one folder they can check
without safeguard.

A bundle holds the report (HTML, JSON, Markdown), the policy exactly as it was applied, the model file hashes,
who ran what with which software, the audit chain and its head (signed when a key is given), and
``MANIFEST.sha256``, which ``sha256sum -c`` checks. It is written to a hidden folder beside the destination and
renamed into place when complete, so a half-written bundle is never mistaken for one.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safeguard import __version__
from safeguard.errors import AuditError

MANIFEST = "MANIFEST.sha256"
BUNDLE_FILES = ("report.html", "report.json", "summary.md", "policy.yaml", "policy.canonical.json", "hashes.json",
                "environment.json", "audit_events.jsonl", "chain_head.json", MANIFEST)
_RUN_ENVIRONMENT_FIELDS = ("id", "kind", "status", "started_at", "finished_at", "user", "host", "pid", "argv",
                           "versions")


# --- keys ----------------------------------------------------------------------------------------------------------

def public_key_path(key_file: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(key_file)}.pub")


def write_key_pair(key_file: str | os.PathLike) -> tuple[str, Path, Path]:
    """Write a new ed25519 private key (hex, mode 0600) to ``key_file`` and its public key to ``key_file.pub``;
    returns (key id, private path, public path). Existing files are never overwritten."""
    from safeguard.integrity import generate_signing_key, key_id

    private_path, public_path = Path(key_file), public_key_path(key_file)
    for path in (private_path, public_path):
        if path.exists():
            raise AuditError("a key file already exists there", file=str(path),
                             fix="choose another --out, or remove the old key pair yourself")
    private, public = generate_signing_key()
    _create_exclusive(private_path, private.hex() + "\n", 0o600)
    _create_exclusive(public_path, public.hex() + "\n", 0o644)
    return key_id(public), private_path, public_path


def _create_exclusive(path: Path, text: str, mode: int) -> None:
    # O_EXCL: never follow or clobber a file someone else put there; the mode applies from the first byte.
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise AuditError(f"cannot create the key file: {exc.strerror}", file=str(path),
                         fix="choose a writable folder and a new file name") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)  # the umask may have removed bits we asked for


def read_key_file(path: str | os.PathLike) -> bytes:
    """A 32-byte key from a file holding 64 hex digits (as ``write_key_pair`` writes) or the raw bytes."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read the key file: {exc.strerror}", file=str(path), fix="check the path") from None
    if len(raw) == 32:
        return raw
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != 32:
        raise AuditError("not an ed25519 key file (64 hex digits)", file=str(path),
                         fix="create a key pair with 'safeguard audit keygen --out KEYFILE'")
    return key


# --- the bundle ----------------------------------------------------------------------------------------------------

def export_bundle(db, run_id: str, out_dir: str | os.PathLike, *, key_bytes: bytes | str | None = None) -> Path:
    """Write the evidence bundle of an apply or probe run (its latest probe) to the new folder ``out_dir``.

    With ``key_bytes`` (an ed25519 private seed) the chain head is signed with ``sign_head``, which also records
    the signature in the chain; ``chain_head.json`` then carries the signature, public key and key id.
    """
    from safeguard.stages.report import report_data
    from safeguard.stages.runs import evidence_dir_of
    from safeguard.report import render_html, render_json, render_markdown

    out = Path(out_dir).resolve()
    if out.exists():
        raise AuditError("the bundle folder already exists", file=str(out), fix="choose a new --out folder")
    data = report_data(db, run_id)
    apply_run = db.get_run(data["apply_run"]["id"])
    probe_run = db.get_run(data["run"]["id"])
    head = _chain_head(db, key_bytes)  # before reading the events, so they include the head (and its signature)
    files = {
        "report.html": render_html(data, evidence_dir_of(db, probe_run)).encode("utf-8"),
        "report.json": render_json(data).encode("utf-8"),
        "summary.md": render_markdown(data).encode("utf-8"),
        "policy.yaml": apply_run["policy_text"].encode("utf-8"),  # the text as it was applied, byte for byte
        "policy.canonical.json": apply_run["policy_canonical_json"].encode("utf-8"),
        "hashes.json": _json_bytes(_model_hashes(db, apply_run["id"])),
        "environment.json": _json_bytes(_environment(apply_run, probe_run)),
        "audit_events.jsonl": _events_jsonl(db),
        "chain_head.json": _json_bytes(head),
    }
    return _write_folder_atomically(out, files)


def _chain_head(db, key_bytes: bytes | str | None) -> dict[str, Any]:
    from safeguard.integrity import sign_head, verify_chain

    if key_bytes is not None:
        return sign_head(db, key_bytes)  # exactly as signed: any added key would break the signature
    result = verify_chain(db)
    if not result.ok:
        raise AuditError(f"refusing to export evidence from a broken audit chain: {result.reason}", file=db.location,
                         fix="investigate the tampering; restore the database from a backup")
    return {"database": db.url, "seq": result.head_seq, "row_hash": result.head_hash,
            "verified_events": result.checked, "verified_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _model_hashes(db, apply_run_id: str) -> dict[str, Any]:
    """The input and output models' files exactly as the apply run recorded them."""
    return {m["role"]: {"path": m["path"], "revision": m["revision"], "tree_sha256": m["tree_sha256"],
                        "files": m["files"]} for m in db.run_models(apply_run_id)}


def _environment(apply_run: dict, probe_run: dict) -> dict[str, Any]:
    runs = [apply_run] if apply_run["id"] == probe_run["id"] else [apply_run, probe_run]
    return {"runs": [{k: run.get(k) for k in _RUN_ENVIRONMENT_FIELDS} for run in runs],
            "exported_with": {"safeguard": __version__, "python": platform.python_version()}}


def _events_jsonl(db) -> bytes:
    """The whole chain, one canonical JSON event per line, so every link back to the genesis can be re-checked."""
    from safeguard.db import canonical_json

    return "".join(canonical_json(event) + "\n" for event in db.list_events()).encode("utf-8")


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _write_folder_atomically(out: Path, files: dict[str, bytes]) -> Path:
    from safeguard.files import publish_folder, staged_folder

    try:
        with staged_folder(out, what="the bundle") as tmp:
            for name, content in files.items():
                (tmp / name).write_bytes(content)
            (tmp / MANIFEST).write_bytes(manifest_text(files).encode("utf-8"))
            return publish_folder(tmp, out)
    except OSError as exc:
        raise AuditError(f"writing the bundle failed: {exc.strerror or exc}", file=str(out),
                         fix="free disk space or choose a writable folder") from None


def manifest_text(files: dict[str, bytes]) -> str:
    """sha256sum's format: the hex digest, two spaces, the file name; sorted by name."""
    return "".join(f"{hashlib.sha256(files[name]).hexdigest()}  {name}\n" for name in sorted(files))


def verify_manifest(folder: str | os.PathLike) -> list[str]:
    """Problems with a bundle's files against its manifest (empty when every file is listed and matches)."""
    folder = Path(folder)
    listed: dict[str, str] = {}
    for line in (folder / MANIFEST).read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    problems = [f"{name}: not in the manifest" for name in sorted(p.name for p in folder.iterdir())
                if name != MANIFEST and name not in listed]
    for name, digest in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems
