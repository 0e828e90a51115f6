"""The model, migration, chain and concurrency checks again, on a real PostgreSQL server from tests/pg.py.

If no server can be started these tests fail; ``SAFEGUARD_SKIP_PG=1`` skips them explicitly.
"""
from __future__ import annotations

import os

import pytest
from sqlalchemy import text

from safeguard.integrity import verify_chain
from safeguard.db import open_db
from safeguard.errors import AuditError

from pg import PostgresUnavailable, start_postgres
from test_audit_chain import (ANCHOR_CASES, TAMPER_CASES, check_anchor_case, check_tamper_case,
                              check_untouched_chain_verifies)
from test_db import DB_CHECKS
from test_db_concurrency import run_writers
from test_migrations import (check_downgrade_and_upgrade_again, check_guard_triggers, check_newer_schema_is_refused,
                             check_schema_matches_models)


@pytest.fixture(scope="module")
def server():
    if os.environ.get("SAFEGUARD_SKIP_PG") == "1":
        pytest.skip("SAFEGUARD_SKIP_PG=1")
    try:
        running, problem = start_postgres(), None
    except PostgresUnavailable as e:
        running, problem = None, str(e)
    if problem:  # failed outside the except block, so the report shows the reason, not a chained traceback
        pytest.fail(f"the PostgreSQL tests need a server and none could be started: {problem}\n"
                    "Install PostgreSQL (apt-get install -y postgresql), point SAFEGUARD_TEST_PG_URL at a server "
                    "whose role may CREATE DATABASE, or set SAFEGUARD_SKIP_PG=1 to skip these tests.", pytrace=False)
    yield running
    running.stop()


@pytest.fixture
def url(server):
    return server.create_database()


@pytest.fixture
def db(url):
    database = open_db(url)
    yield database
    database.close()


def test_server_is_postgresql(db, server):
    assert db.dialect == "postgresql" and int(server.version.split(".")[0]) >= 11


def test_empty_database_migrates_to_the_models(db):
    check_schema_matches_models(db)
    with db.engine.connect() as connection:
        triggers = set(connection.execute(text(
            "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")).scalars())
    assert triggers == {"audit_events_append_only", "audit_events_no_truncate", "audit_events_extend_head",
                        "audit_head_advance_only", "audit_head_no_delete", "audit_head_no_truncate"}


def test_newer_schema_is_refused(db, url):
    check_newer_schema_is_refused(db, url)


def test_guard_triggers(db):
    check_guard_triggers(db)


def test_downgrade_and_upgrade_again(db):
    check_downgrade_and_upgrade_again(db)


@pytest.mark.parametrize("check", DB_CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
def test_shared_database_check(db, check):
    check(db)


def test_untouched_chain_verifies(db):
    check_untouched_chain_verifies(db)


@pytest.mark.parametrize("name", TAMPER_CASES)
def test_tampering_is_caught(db, name):
    check_tamper_case(db, name)


@pytest.mark.parametrize("name", ANCHOR_CASES)
def test_consistent_rewrite_is_caught_by_the_signed_head(db, name):
    check_anchor_case(db, name)


def test_concurrent_writers(url):
    run_writers(url, processes=3)


def test_unreachable_server_is_an_audit_error(server):
    with pytest.raises(AuditError, match="cannot open the audit database"):
        open_db(server.url("no_such_database"))


def test_non_ascii_text_round_trips(db):
    run_id = db.start_run("probe", argv=["safeguard", "probe", "políticas/ß.yaml"])
    db.add_sample(run_id, probe="canonical", concept="ピカチュウ", model_role="edited", prompt="une photo de ✓",
                  seed=2**62, scores={"score": 1e300, "tiny": 5e-324, "neg": -0.0})
    db.finish_run(run_id, "done")
    sample = db.run_as_dict(run_id)["samples"][0]
    assert (sample["concept"], sample["seed"], sample["scores"]["tiny"]) == ("ピカチュウ", 2**62, 5e-324)
    assert verify_chain(db).ok
