"""The audit chain catches tampering: each case edits the database directly, as someone holding the file would
after dropping the guard triggers, and ``verify_chain`` must report it. Signed heads catch consistent rewrites.

``populate``, ``TAMPER_CASES``, ``ANCHOR_CASES`` and the ``check_*`` functions are shared with tests/test_postgres.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, insert, select, text, update

from safeguard.integrity import (SIGNED_HEAD_EVENT, generate_signing_key, key_id, public_key_for, sign_head,
                             verify_chain, verify_signature)
from safeguard.db import (AuditEvent, AuditHead, ConceptEdit, Database, GateDecision, LayerEdit, Model, ProbeResult,
                          Run, Sample, canonical_json, event_row_hash, open_db)
from safeguard.errors import AuditError

EVENTS = AuditEvent.__table__
HEAD = AuditHead.__table__


@dataclass
class Populated:
    """What ``populate`` wrote: run ids, and the sequence numbers of the chain."""
    done_run: str
    failed_run: str
    model: str
    last_seq: int
    middle_seq: int


def populate(db: Database) -> Populated:
    """A realistic chain: a finished apply run with evidence, a failed probe run and free-standing events."""
    model = db.record_model("/models/sd", "main", "input",
                            [{"path": "unet.safetensors", "sha256": "ab" * 32, "size": 10}])
    done = db.start_run("apply", input_model_id=model, eraser_name="uce", eraser_params={"lambda": 0.1}, seed=1)
    db.add_concept_edits(done, [{"concept": "pikachu", "category": "character", "forget_prompts": ["pikachu"],
                                 "retain_prompts": ["mario"]}])
    db.add_layer_edits(done, [{"module": f"up_blocks.{i}.attn2", "stats": {"rank": i}} for i in range(3)])
    db.add_samples(done, [dict(probe="canonical", concept="pikachu", model_role=role, prompt="pikachu", seed=s,
                               image_sha256="cd" * 32, scores={"pikachu": 0.1 * s}, label="other")
                          for role in ("original", "edited") for s in range(3)])
    db.replace_probe_results(done, [dict(probe=probe, concept="pikachu", status="fail", n=3, hits=2)
                                    for probe in ("canonical", "paraphrase")])  # a first attempt, replaced
    db.replace_probe_results(done, [dict(probe="canonical", concept="pikachu", status="pass", n=3, hits=0,
                                         ci_high=0.5, threshold=0.3)])
    db.record_event("policy.override", {"threshold": 0.3, "by": "ci", "note": "élan ✓"}, done)
    db.finish_run(done, "done")
    db.add_gate_decision(done, "pass", 0, ["ok"])
    failed = db.start_run("probe", parent_run_id=done)
    db.finish_run(failed, "failed", error="interrupted")
    db.record_event("audit.note", {"ok": True})
    last_seq = db.head()[0]
    return Populated(done, failed, model, last_seq, last_seq // 2)


def drop_guards(connection) -> None:
    """Remove the guard triggers, as anyone with write access to the database can."""
    if connection.dialect.name == "sqlite":
        for (name,) in connection.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).all():
            connection.execute(text(f"DROP TRIGGER {name}"))
    else:
        connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
        connection.execute(text("ALTER TABLE audit_head DISABLE TRIGGER USER"))


def event_row(connection, seq: int):
    return connection.execute(select(EVENTS).where(EVENTS.c.seq == seq)).mappings().one()


def rehash(connection, seq: int, **changes) -> str:
    """Change event ``seq`` and recompute its own row_hash (but not its successors')."""
    row = {**event_row(connection, seq), **changes}
    row_hash = event_row_hash(row["prev_hash"], seq, row["run_id"], row["event"], row["payload"], row["created_at"])
    connection.execute(update(EVENTS).where(EVENTS.c.seq == seq).values(**changes, row_hash=row_hash))
    return row_hash


def set_head(connection, seq: int, row_hash: str) -> None:
    connection.execute(update(HEAD).values(seq=seq, row_hash=row_hash))


def rewrite_from(connection, start: int, change) -> None:
    """Rewrite events ``start``.. with ``change(row) -> changes`` and recompute every later hash and the head."""
    prev_hash = event_row(connection, start)["prev_hash"]
    seqs = connection.execute(select(EVENTS.c.seq).where(EVENTS.c.seq >= start).order_by(EVENTS.c.seq)).scalars()
    for seq in list(seqs):
        row = {**event_row(connection, seq)}
        row.update(change(row) if seq == start else {})
        row["prev_hash"] = prev_hash
        prev_hash = event_row_hash(prev_hash, seq, row["run_id"], row["event"], row["payload"], row["created_at"])
        connection.execute(update(EVENTS).where(EVENTS.c.seq == seq).values(
            payload=row["payload"], event=row["event"], prev_hash=row["prev_hash"], row_hash=prev_hash))
    set_head(connection, seq, prev_hash)


def forged_event(connection, seq: int, prev_hash: str, event: str = "forged", payload=None) -> dict:
    created_at = "2020-01-01T00:00:00.000000Z"
    payload = payload if payload is not None else {"by": "attacker"}
    return dict(seq=seq, run_id=None, event=event, payload=payload, created_at=created_at, prev_hash=prev_hash,
                row_hash=event_row_hash(prev_hash, seq, None, event, payload, created_at))


def swap_seq(connection, a: int, b: int) -> None:
    connection.execute(update(EVENTS).where(EVENTS.c.seq == a).values(seq=-1))
    connection.execute(update(EVENTS).where(EVENTS.c.seq == b).values(seq=a))
    connection.execute(update(EVENTS).where(EVENTS.c.seq == -1).values(seq=b))


def first_id(connection, model, **where):
    table = model.__table__
    query = select(table.c.id).order_by(table.c.id)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    return connection.execute(query).scalars().first()


def edit(model, column_values, **where):
    def tamper(connection, info):
        key = first_id(connection, model, **where)
        connection.execute(update(model.__table__).where(model.__table__.c.id == key).values(**column_values))
    return tamper


def remove(model, **where):
    def tamper(connection, info):
        key = first_id(connection, model, **where)
        connection.execute(delete(model.__table__).where(model.__table__.c.id == key))
    return tamper


def _insert_event_at_end(connection, info):
    last = event_row(connection, info.last_seq)
    connection.execute(insert(EVENTS).values(**forged_event(connection, info.last_seq + 1, last["row_hash"])))


def _insert_event_at_end_and_move_head_wrongly(connection, info):
    last = event_row(connection, info.last_seq)
    connection.execute(insert(EVENTS).values(**forged_event(connection, info.last_seq + 1, last["row_hash"])))
    set_head(connection, info.last_seq + 1, "0" * 64)


def _insert_event_before_the_first(connection, info):
    connection.execute(insert(EVENTS).values(**forged_event(connection, 0, "0" * 64)))


def _insert_event_in_a_gap(connection, info):
    # make room by shifting the tail up by one, then slot a forged event into the hole
    for seq in range(info.last_seq, info.middle_seq, -1):
        connection.execute(update(EVENTS).where(EVENTS.c.seq == seq).values(seq=seq + 1))
    prev = event_row(connection, info.middle_seq)["row_hash"]
    connection.execute(insert(EVENTS).values(**forged_event(connection, info.middle_seq + 1, prev)))
    set_head(connection, info.last_seq + 1, event_row(connection, info.last_seq + 1)["row_hash"])


def _delete_last_event(connection, info):
    connection.execute(delete(EVENTS).where(EVENTS.c.seq == info.last_seq))


def _delete_middle_event(connection, info):
    connection.execute(delete(EVENTS).where(EVENTS.c.seq == info.middle_seq))


def _delete_middle_event_and_relink_the_next(connection, info):
    before = event_row(connection, info.middle_seq - 1)["row_hash"]
    connection.execute(delete(EVENTS).where(EVENTS.c.seq == info.middle_seq))
    rehash(connection, info.middle_seq + 1, prev_hash=before)


def _modify_and_rehash_middle(connection, info):
    row = event_row(connection, info.middle_seq)
    rehash(connection, info.middle_seq, payload={**row["payload"], "count": 999})


def _modify_last_with_stale_head(connection, info):
    rehash(connection, info.last_seq, payload={"ok": False})  # the head still names the old hash


def _swap_payloads(connection, info):
    a, b = event_row(connection, info.middle_seq), event_row(connection, info.middle_seq + 1)
    connection.execute(update(EVENTS).where(EVENTS.c.seq == a["seq"]).values(payload=b["payload"]))
    connection.execute(update(EVENTS).where(EVENTS.c.seq == b["seq"]).values(payload=a["payload"]))


def _reassign_event_to_other_run(connection, info):
    seq = connection.execute(select(EVENTS.c.seq).where(EVENTS.c.event == "run.finished")).scalars().first()
    connection.execute(update(EVENTS).where(EVENTS.c.seq == seq).values(run_id=info.failed_run))


def _rewrite_run_and_its_digest(connection, info):
    # change the failed run's error and also forge the digest inside the event that recorded it: the chain breaks
    connection.execute(update(Run.__table__).where(Run.__table__.c.id == info.failed_run).values(error=None))
    seq = connection.execute(select(EVENTS.c.seq).where(EVENTS.c.run_id == info.failed_run)
                             .order_by(EVENTS.c.seq.desc())).scalars().first()
    payload = event_row(connection, seq)["payload"]
    payload["records"]["runs"][info.failed_run] = "0" * 64
    connection.execute(update(EVENTS).where(EVENTS.c.seq == seq).values(payload=payload))


def _insert_sample(connection, info):
    connection.execute(insert(Sample.__table__).values(
        run_id=info.done_run, probe="canonical", concept="pikachu", model_role="edited", prompt="extra", seed=99,
        label="other", created_at="2020-01-01T00:00:00.000000Z"))


def _insert_gate_decision(connection, info):
    connection.execute(insert(GateDecision.__table__).values(
        run_id=info.failed_run, verdict="pass", exit_code=0, reasons=[], created_at="2020-01-01T00:00:00.000000Z"))


def _put_back_replaced_probe_result(connection, info):
    connection.execute(insert(ProbeResult.__table__).values(
        id=2, run_id=info.done_run, probe="paraphrase", concept="pikachu", status="pass", n=3, hits=0))


def _insert_run(connection, info):
    connection.execute(insert(Run.__table__).values(
        id="01ZZZZZZZZZZZZZZZZZZZZZZZZ", kind="apply", status="done", started_at="2020-01-01T00:00:00.000000Z",
        argv=[], versions={}))


TAMPER_CASES = {
    # audit_events: modified rows
    "event payload changed": lambda c, i: c.execute(update(EVENTS).where(EVENTS.c.seq == i.middle_seq)
                                                     .values(payload={"forged": True})),
    "event name changed": lambda c, i: c.execute(update(EVENTS).where(EVENTS.c.seq == i.middle_seq)
                                                  .values(event="run.approved")),
    "event run_id cleared": lambda c, i: c.execute(update(EVENTS).where(EVENTS.c.seq == i.middle_seq)
                                                    .values(run_id=None)),
    "event reassigned to another run": _reassign_event_to_other_run,
    "event time changed": lambda c, i: c.execute(update(EVENTS).where(EVENTS.c.seq == 2)
                                                  .values(created_at="2000-01-01T00:00:00.000000Z")),
    "first event changed": lambda c, i: c.execute(update(EVENTS).where(EVENTS.c.seq == 1).values(event="x")),
    "last event changed": lambda c, i: c.execute(update(EVENTS).where(EVENTS.c.seq == i.last_seq)
                                                  .values(payload={"ok": False})),
    "prev_hash changed": lambda c, i: c.execute(update(EVENTS).where(EVENTS.c.seq == i.middle_seq)
                                                 .values(prev_hash="1" * 64)),
    "row_hash changed": lambda c, i: c.execute(update(EVENTS).where(EVENTS.c.seq == i.middle_seq)
                                                .values(row_hash="2" * 64)),
    "event changed and its own hash recomputed": _modify_and_rehash_middle,
    "last event rehashed, head left stale": _modify_last_with_stale_head,
    "payloads of two events swapped": _swap_payloads,
    "two events swapped in order": lambda c, i: swap_seq(c, i.middle_seq, i.middle_seq + 1),
    # audit_events: deleted rows
    "first event deleted": lambda c, i: c.execute(delete(EVENTS).where(EVENTS.c.seq == 1)),
    "middle event deleted": _delete_middle_event,
    "middle event deleted, the next relinked and rehashed": _delete_middle_event_and_relink_the_next,
    "last event deleted": _delete_last_event,
    "last three events deleted": lambda c, i: c.execute(delete(EVENTS).where(EVENTS.c.seq > i.last_seq - 3)),
    "all events deleted": lambda c, i: c.execute(delete(EVENTS)),
    # audit_events: inserted rows
    "event appended without moving the head": _insert_event_at_end,
    "event appended, head set to a wrong hash": _insert_event_at_end_and_move_head_wrongly,
    "event inserted before the first": _insert_event_before_the_first,
    "event inserted in the middle (tail renumbered)": _insert_event_in_a_gap,
    # audit_head
    "head moved back": lambda c, i: set_head(c, i.last_seq - 1, event_row(c, i.last_seq - 1)["row_hash"]),
    "head hash changed": lambda c, i: c.execute(update(HEAD).values(row_hash="3" * 64)),
    "head deleted": lambda c, i: c.execute(delete(HEAD)),
    # evidence rows
    "sample label changed": edit(Sample, {"label": "pikachu"}, model_role="edited"),
    "sample scores changed": edit(Sample, {"scores": {"pikachu": 0.99}}),
    "sample deleted": remove(Sample, model_role="edited"),
    "sample inserted": _insert_sample,
    "probe result hits changed": edit(ProbeResult, {"hits": 0, "status": "pass", "rate": 0.0, "n": 300}),
    "probe result deleted": remove(ProbeResult),
    "replaced probe result put back": _put_back_replaced_probe_result,
    "gate verdict changed": edit(GateDecision, {"verdict": "fail", "exit_code": 10}),
    "gate decision inserted": _insert_gate_decision,
    "failed run marked done": lambda c, i: c.execute(update(Run.__table__).where(Run.__table__.c.id == i.failed_run)
                                                      .values(status="done", error=None)),
    "run and the digest in its event both forged": _rewrite_run_and_its_digest,
    "run inserted": _insert_run,
    "run policy hash changed": lambda c, i: c.execute(update(Run.__table__).where(Run.__table__.c.id == i.done_run)
                                                       .values(policy_sha256="4" * 64)),
    "model file hash changed": edit(Model, {"files": [{"path": "unet.safetensors", "sha256": "ef" * 32, "size": 10}]}),
    "concept edit prompts changed": edit(ConceptEdit, {"forget_prompts": []}),
    "layer edit deleted": remove(LayerEdit),
}

# Consistent rewrites: the chain is internally valid again, so only a head recorded earlier can show them.
ANCHOR_CASES = {
    "last event deleted and head moved back": lambda c, i: (
        _delete_last_event(c, i), set_head(c, i.last_seq - 1, event_row(c, i.last_seq - 1)["row_hash"])),
    "last event rewritten and head recomputed": lambda c, i: set_head(
        c, i.last_seq, rehash(c, i.last_seq, payload={"ok": False})),
    "chain rewritten from the middle": lambda c, i: rewrite_from(
        c, i.middle_seq, lambda row: {"event": "run.approved"}),
    "whole chain rewritten": lambda c, i: rewrite_from(c, 1, lambda row: {"payload": {**row["payload"], "x": 1}}),
}


def tamper(db: Database, case) -> Populated:
    info = populate(db)
    assert verify_chain(db).ok
    with db.engine.begin() as connection:
        drop_guards(connection)
        case(connection, info)
    return info


def check_tamper_case(db: Database, name: str) -> None:
    tamper(db, TAMPER_CASES[name])
    result = verify_chain(db)
    assert not result.ok and result.reason, f"{name!r} was not caught"


def check_anchor_case(db: Database, name: str) -> None:
    private, public = generate_signing_key()
    info = populate(db)
    anchor = sign_head(db, private, record=False)  # kept outside the database, e.g. as a CI artifact
    with db.engine.begin() as connection:
        drop_guards(connection)
        ANCHOR_CASES[name](connection, info)
    assert verify_chain(db).ok  # consistent: the chain alone cannot tell
    result = verify_chain(db, anchor=anchor, public_key=public)
    assert not result.ok and result.reason, f"{name!r} was not caught against the signed head"


def check_untouched_chain_verifies(db: Database) -> None:
    info = populate(db)
    result = verify_chain(db)
    assert result.ok and result.reason is None and result.first_broken_seq is None
    assert result.checked == result.head_seq == info.last_seq == 13
    assert result.records_checked == 1 + 2 + 1 + 3 + 6 + 1 + 1  # model, runs, concept, layers, samples, probe, gate
    assert (result.head_seq, result.head_hash) == db.head()


# --- SQLite --------------------------------------------------------------------------------------------------------

@pytest.fixture
def db(tmp_path):
    database = open_db(f"sqlite:///{tmp_path / 'audit.db'}")
    yield database
    database.close()


def test_untouched_chain_verifies(db):
    check_untouched_chain_verifies(db)


def test_empty_chain_verifies(db):
    result = verify_chain(db)
    assert (result.ok, result.checked, result.head_seq, result.records_checked) == (True, 0, 0, 0)


def test_enough_tamper_cases():
    assert len(TAMPER_CASES) >= 20 and len(ANCHOR_CASES) >= 3


@pytest.mark.parametrize("name", TAMPER_CASES)
def test_tampering_is_caught(db, name):
    check_tamper_case(db, name)


@pytest.mark.parametrize("name", ANCHOR_CASES)
def test_consistent_rewrite_is_caught_by_the_signed_head(db, name):
    check_anchor_case(db, name)


def test_first_broken_seq_points_at_the_tampering(db):
    info = tamper(db, TAMPER_CASES["middle event deleted"])
    assert verify_chain(db).first_broken_seq == info.middle_seq
    with db.engine.begin() as connection:
        connection.execute(update(EVENTS).where(EVENTS.c.seq == 3).values(event="x"))
    result = verify_chain(db)
    assert (result.first_broken_seq, result.checked) == (3, 2)
    assert "event 3 was changed" in result.reason


def test_evidence_tampering_names_the_row_and_event(db):
    info = tamper(db, edit(GateDecision, {"verdict": "fail"}))
    result = verify_chain(db)
    seq = next(e["seq"] for e in db.list_events(info.done_run) if e["event"] == "gate_decision.added")
    assert result.first_broken_seq == seq
    assert result.reason == f"gate_decisions row 1 differs from what event {seq} recorded"


def test_reformatted_json_is_not_tampering(db):
    populate(db)
    with db.engine.begin() as connection:  # the same JSON, spelled differently: nothing was altered
        drop_guards(connection)
        connection.execute(text("UPDATE audit_events SET payload = json(payload)"))
        connection.execute(text("UPDATE samples SET scores = ' ' || json(scores) || ' '"))
    assert verify_chain(db).ok


def test_signed_head_round_trip(db):
    private, public = generate_signing_key()
    populate(db)
    before = db.head()
    head = sign_head(db, private.hex())
    assert (head["seq"], head["row_hash"]) == before
    assert db.list_events()[-1]["event"] == SIGNED_HEAD_EVENT and db.list_events()[-1]["payload"] == head
    assert head["key_id"] == key_id(public) and head["public_key"] == public.hex()
    assert public_key_for(private) == public
    assert verify_signature(head, public) and verify_signature(head, public.hex())
    result = verify_chain(db, anchor=head, public_key=public)
    assert result.ok and result.signatures_checked == 2  # the anchor and its copy in the chain
    db.record_event("later")  # a signed head stays valid while the chain grows
    assert verify_chain(db, public_key=public).ok

    other_private, other_public = generate_signing_key()
    assert not verify_signature(head, other_public)
    for field, value in (("seq", head["seq"] - 1), ("row_hash", "5" * 64), ("signed_at", "2000"),
                         ("signature", "00" * 64), ("signature", "zz"), ("algorithm", "rsa")):
        assert not verify_signature({**head, field: value}, public), field
    forged = {**head, "row_hash": "5" * 64}
    result = verify_chain(db, anchor=forged, public_key=public)
    assert not result.ok and "signature of the anchored head does not verify" in result.reason
    assert "no head in the chain is signed with key" in verify_chain(db, public_key=other_public).reason
    with pytest.raises(AuditError, match="32 bytes"):
        sign_head(db, b"short")


def test_rewrite_before_a_signed_head_in_the_chain_is_caught(db):
    info = populate(db)
    sign_head(db, generate_signing_key()[0])
    with db.engine.begin() as connection:  # rewrite up to the signed head, keeping the signed-head event
        drop_guards(connection)
        rewrite_from(connection, info.middle_seq, lambda row: {"event": "run.approved"})
    result = verify_chain(db)  # no key needed: the recorded head no longer matches
    assert not result.ok and f"differs from the head signed in event {info.last_seq + 1}" in result.reason


def test_rewrite_that_drops_the_signed_heads_is_caught_with_the_key(db):
    private, public = generate_signing_key()
    info = populate(db)
    sign_head(db, private)
    with db.engine.begin() as connection:
        drop_guards(connection)
        connection.execute(delete(EVENTS).where(EVENTS.c.event == SIGNED_HEAD_EVENT))
        set_head(connection, info.last_seq, event_row(connection, info.last_seq)["row_hash"])
        rewrite_from(connection, info.middle_seq, lambda row: {"event": "run.approved"})
    assert verify_chain(db).ok  # consistent again: only the key shows it
    result = verify_chain(db, public_key=public)
    assert not result.ok and "no head in the chain is signed with key" in result.reason


def test_broken_chain_is_not_signed(db):
    tamper(db, TAMPER_CASES["event payload changed"])
    with pytest.raises(AuditError, match="refusing to sign a broken audit chain"):
        sign_head(db, generate_signing_key()[0])


payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10)


@settings(max_examples=40, deadline=None)
@given(payload=payloads, field=st.sampled_from(["event", "payload", "created_at", "run_id"]))
def test_any_change_to_any_field_is_caught(payload, field):
    with open_db("sqlite://") as db:
        other_run = db.start_run("audit")
        seq = db.record_event("under test", {"value": payload})
        db.record_event("last")
        assert verify_chain(db).ok
        with db.engine.begin() as connection:
            drop_guards(connection)
            row = event_row(connection, seq)
            changed = {"event": row["event"] + "!", "created_at": row["created_at"].replace("Z", "+00:00"),
                       "run_id": other_run, "payload": [row["payload"]]}[field]
            connection.execute(update(EVENTS).where(EVENTS.c.seq == seq).values(**{field: changed}))
        result = verify_chain(db)
        assert not result.ok and result.first_broken_seq == seq
        assert canonical_json(row["payload"]) == canonical_json({"value": payload})  # stored is what was hashed
