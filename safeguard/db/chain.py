"""The hash chain: appending an event inside a write transaction, and the digests of the rows it covers."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from safeguard.errors import AuditError

from .schema import AuditEvent, AuditHead, Base
from .values import event_row_hash, json_document, record_digest, utc_now


def append_event(session: Session, event_name: str, payload: Any = None, run_id: str | None = None) -> AuditEvent:
    """Append one event to the chain inside ``session``'s transaction, holding the chain lock until it commits."""
    # SQLite: the session's BEGIN IMMEDIATE already holds the write lock. PostgreSQL: the row lock on
    # audit_head serialises appenders; populate_existing re-reads the head committed by the previous holder.
    head = session.execute(select(AuditHead).where(AuditHead.id == 1).with_for_update()
                           .execution_options(populate_existing=True)).scalar_one_or_none()
    if head is None:
        raise AuditError("the audit_head row is missing, so the chain cannot be extended",
                         fix="run safeguard.integrity.verify_chain and restore the database from a backup")
    payload = json_document(payload, "payload")
    created_at = utc_now()
    seq = head.seq + 1
    row = AuditEvent(seq=seq, run_id=run_id, event=event_name, payload=payload, created_at=created_at,
                     prev_hash=head.row_hash,
                     row_hash=event_row_hash(head.row_hash, seq, run_id, event_name, payload, created_at))
    session.add(row)
    session.flush()  # the event row before the head update, so the audit_head trigger sees a real successor
    head.seq, head.row_hash, head.updated_at = seq, row.row_hash, created_at
    session.flush()
    return row


def row_digests(session: Session, model: type[Base], keys: Iterable[Any]) -> dict[str, str]:
    """{primary key as text: record_digest} for rows of ``model``, read back as the database stores them."""
    table = model.__table__
    pk = next(iter(table.primary_key.columns))
    keys, digests = list(keys), {}
    for start in range(0, len(keys), 500):  # stay far below SQLite's bound-parameter limit
        for row in session.execute(select(table).where(pk.in_(keys[start:start + 500]))).mappings():
            digests[str(row[pk.name])] = record_digest(row)
    return digests


def _records_payload(session: Session, model: type[Base], keys: Iterable[Any]) -> dict[str, dict[str, str]]:
    session.flush()
    return {model.__tablename__: row_digests(session, model, keys)}
