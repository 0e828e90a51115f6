"""Tamper evidence for the audit database: verify the hash chain and the evidence rows, sign and check its head.

The chain (``audit_events``) links each event to the previous one by hash; ``audit_head`` names the last event, so a
cut tail shows; each event that wrote evidence rows carries their digests, so edits to those tables show. Someone who
rewrites the file consistently can only be caught against a head recorded earlier: a signed head (``sign_head``
also appends it to the chain as an ``audit.head_signed`` event) or, strongest, one kept outside the database, such
as a CI artifact, passed as ``anchor``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from safeguard.db import (EVIDENCE_MODELS, GENESIS_HASH, AuditEvent, AuditHead, Database, append_event,
                          canonical_json, event_row_hash, record_digest, utc_now)
from safeguard.errors import AuditError

__all__ = ["VerifyResult", "canonical_json", "verify_chain", "sign_head", "verify_signature", "generate_signing_key",
           "public_key_for", "key_id", "SIGNED_HEAD_EVENT"]

SIGNATURE_ALGORITHM = "ed25519"
SIGNED_HEAD_EVENT = "audit.head_signed"


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of ``verify_chain``; ``first_broken_seq`` is the first failing event (None if none, or not an event)."""
    ok: bool
    checked: int  # events whose hashes were recomputed
    first_broken_seq: int | None = None
    reason: str | None = None
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    records_checked: int = 0  # evidence rows compared with the digests their events recorded
    signatures_checked: int = 0  # signed heads verified with the given public key

    def __bool__(self) -> bool:
        return self.ok


def verify_chain(db: Database, anchor: Mapping[str, Any] | None = None,
                 public_key: bytes | str | None = None) -> VerifyResult:
    """Recompute every event hash; check the links, the head row, the evidence rows and every recorded head.

    Recorded heads are the ``audit.head_signed`` events in the chain and ``anchor`` ({"seq", "row_hash"}, e.g. a
    ``sign_head`` result kept elsewhere); each must match the chain at its seq. With ``public_key``, the signatures
    made with that key are checked too, and at least one must exist.
    """
    checked, expected_seq, prev_hash = 0, 1, GENESIS_HASH
    signatures = 0
    # (table, key) -> (seq of the latest event that wrote the row, its digest; None if that event deleted it)
    records: dict[tuple[str, str], tuple[int, str | None]] = {}

    def broken(seq: int | None, reason: str) -> VerifyResult:
        return VerifyResult(False, checked, seq, reason, expected_seq - 1, prev_hash, 0, signatures)

    with db.read_session() as session:
        heads: list[tuple[str, Mapping[str, Any]]] = []  # (description, head)
        if anchor is not None:
            heads.append(("the anchored head", anchor))
        signed_events = session.execute(select(AuditEvent.seq, AuditEvent.payload)
                                        .where(AuditEvent.event == SIGNED_HEAD_EVENT).order_by(AuditEvent.seq))
        heads += [(f"the head signed in event {seq}", payload) for seq, payload in signed_events
                  if isinstance(payload, Mapping)]
        if public_key is not None:
            wanted = key_id(public_key)
            for description, head in heads:
                if head is anchor or head.get("key_id") == wanted:
                    if not verify_signature(head, public_key):
                        return broken(None, f"the signature of {description} does not verify with this public key")
                    signatures += 1
            if not signatures:
                return broken(None, f"no head in the chain is signed with key {wanted}")
        heads_at: dict[int, list[tuple[str, Mapping[str, Any]]]] = {}
        for description, head in heads:
            heads_at.setdefault(head.get("seq"), []).append((description, head))

        events = session.execute(select(AuditEvent.__table__).order_by(AuditEvent.seq)).mappings()
        for row in events.yield_per(1000):
            seq = row["seq"]
            if seq != expected_seq:
                if seq < expected_seq:
                    return broken(seq, f"event {seq} is out of sequence (expected {expected_seq}): a row was inserted")
                return broken(expected_seq, f"event {expected_seq} is missing (the next is {seq}): a row was deleted")
            if row["prev_hash"] != prev_hash:
                return broken(seq, f"event {seq} does not link to event {seq - 1} (prev_hash differs): "
                                   "a row was deleted, inserted or changed")
            actual = event_row_hash(prev_hash, seq, row["run_id"], row["event"], row["payload"], row["created_at"])
            if actual != row["row_hash"]:
                return broken(seq, f"event {seq} was changed after it was written (its row_hash does not match)")
            for description, head in heads_at.pop(seq, []):
                if head.get("row_hash") != row["row_hash"]:
                    return broken(seq, f"event {seq} differs from {description}: the chain was rewritten")
            payload = row["payload"]
            if isinstance(payload, Mapping) and isinstance(payload.get("records"), Mapping):
                for table, digests in payload["records"].items():
                    for key, digest in (digests or {}).items():
                        records[(table, key)] = (seq, digest)
            checked += 1
            expected_seq, prev_hash = seq + 1, row["row_hash"]

        head = session.get(AuditHead, 1)
        last_seq = expected_seq - 1
        if head is None:
            return broken(None, "the audit_head row is missing")
        if head.seq != last_seq or head.row_hash != prev_hash:
            if head.seq > last_seq:
                return broken(last_seq + 1, f"the chain ends at event {last_seq} but audit_head records event "
                                            f"{head.seq}: its tail was removed")
            return broken(head.seq + 1 if head.seq < last_seq else head.seq,
                          f"audit_head records event {head.seq} but the chain ends at event {last_seq} "
                          "(events were added without moving the head, or the head was changed)")
        for description, recorded_head in heads_at.pop(0, []):
            if recorded_head.get("row_hash") != GENESIS_HASH:
                return broken(None, f"{description} is not the empty chain's: the chain was rewritten")
        if heads_at:
            seq, unmatched = min(heads_at.items(), key=lambda item: str(item[0]))
            return broken(None, f"{unmatched[0][0]} (event {seq}) is not in the chain, which ends at event "
                                f"{last_seq}: its tail was removed or rewritten")

        records_checked = 0
        for table, model in EVIDENCE_MODELS.items():
            pk = next(iter(model.__table__.primary_key.columns))
            for row in session.execute(select(model.__table__).order_by(pk)).mappings().yield_per(1000):
                key = str(row[pk.name])
                recorded = records.pop((table, key), None)
                if recorded is None:
                    return broken(None, f"{table} row {key} has no audit event: it was inserted outside safeguard")
                if recorded[1] is None:
                    return broken(recorded[0], f"{table} row {key} was deleted by event {recorded[0]} but is back")
                if record_digest(row) != recorded[1]:
                    return broken(recorded[0], f"{table} row {key} differs from what event {recorded[0]} recorded")
                records_checked += 1
        missing = {item: where for item, where in records.items() if where[1] is not None}
        if missing:
            (table, key), (seq, _digest) = min(missing.items(), key=lambda item: item[1][0])
            return broken(seq, f"{table} row {key}, recorded by event {seq}, is missing: it was deleted")
    return VerifyResult(True, checked, None, None, last_seq, prev_hash, records_checked, signatures)


# --- signing -------------------------------------------------------------------------------------------------------

def _nacl():
    try:
        import nacl.exceptions
        import nacl.signing
    except ModuleNotFoundError as e:
        raise AuditError("signing the audit chain needs PyNaCl", fix="pip install 'safeguard[signing]'") from e
    return nacl


def _key_bytes(key: bytes | str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(key.strip()) if isinstance(key, str) else bytes(key)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise AuditError(f"an ed25519 {what} is 32 bytes (64 hex digits)",
                         fix=f"use the {what} from generate_signing_key")
    return raw


def generate_signing_key() -> tuple[bytes, bytes]:
    """A new ed25519 key pair as (private seed, public key), 32 bytes each."""
    nacl = _nacl()
    key = nacl.signing.SigningKey.generate()
    return bytes(key), bytes(key.verify_key)


def public_key_for(private_key: bytes | str) -> bytes:
    """The public key of a private ed25519 seed."""
    return bytes(_nacl().signing.SigningKey(_key_bytes(private_key, "private key")).verify_key)


def key_id(public_key: bytes | str) -> str:
    """A short fingerprint of a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(_key_bytes(public_key, "public key")).hexdigest()[:16]


def _signed_message(head: Mapping[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in head.items() if k != "signature"}).encode("utf-8")


def sign_head(db: Database, key_bytes: bytes | str, *, record: bool = True) -> dict[str, Any]:
    """Verify the chain, sign its head with an ed25519 private seed and (``record``) append the signed head to the
    chain as an ``audit.head_signed`` event; returns the signed head, to keep outside the database too."""
    result = verify_chain(db)
    if not result.ok:
        raise AuditError(f"refusing to sign a broken audit chain: {result.reason}", file=db.location,
                         fix="investigate the tampering; restore the database from a backup")
    nacl = _nacl()
    signing_key = nacl.signing.SigningKey(_key_bytes(key_bytes, "private key"))
    public = bytes(signing_key.verify_key)
    head = {"algorithm": SIGNATURE_ALGORITHM, "database": db.url, "seq": result.head_seq,
            "row_hash": result.head_hash, "signed_at": utc_now(), "public_key": public.hex(),
            "key_id": key_id(public)}
    head["signature"] = signing_key.sign(_signed_message(head)).signature.hex()
    if record:  # if another writer appended meanwhile, the signed head is still a valid earlier point
        with db.session() as session:
            append_event(session, SIGNED_HEAD_EVENT, head)
    return head


def verify_signature(head_dict: Mapping[str, Any], public_key: bytes | str) -> bool:
    """Whether ``head_dict`` (from ``sign_head``) was signed by the private key of ``public_key``, unaltered."""
    nacl = _nacl()
    verify_key = nacl.signing.VerifyKey(_key_bytes(public_key, "public key"))
    if head_dict.get("algorithm") != SIGNATURE_ALGORITHM or not isinstance(head_dict.get("signature"), str):
        return False
    try:
        verify_key.verify(_signed_message(head_dict), bytes.fromhex(head_dict["signature"]))
    except (ValueError, TypeError, nacl.exceptions.BadSignatureError):
        return False
    return True
