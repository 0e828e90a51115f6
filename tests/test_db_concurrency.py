"""Several processes writing runs and events to one database at once lose nothing and never see a lock error.

``run_writers`` is shared with tests/test_postgres.py.
"""
from __future__ import annotations

import multiprocessing
import traceback

from sqlalchemy import func, select

from safeguard.integrity import verify_chain
from safeguard.db import AuditEvent, Model, Run, Sample, open_db

PROCESSES = 4
RUNS_PER_PROCESS = 15
EVENTS_PER_RUN = 4  # run.started, samples.added, a free-standing event, run.finished
SHARED_MODEL = [{"path": "unet.safetensors", "sha256": "ab" * 32, "size": 1}]


def writer(url: str, worker: int, start, opened, errors) -> None:
    """One process: open the (possibly brand-new) database, then write runs with evidence as fast as it can."""
    try:
        start.wait()  # every process opens, and so migrates, at the same moment
        with open_db(url) as db:
            opened.wait(timeout=120)  # and then all write at once, competing for the lock
            # every process records the same model: a race on one unique key
            model = db.record_model("/models/shared", None, "input", SHARED_MODEL)
            for i in range(RUNS_PER_PROCESS):
                run_id = db.start_run("probe", input_model_id=model, argv=[f"worker-{worker}", str(i)])
                db.add_samples(run_id, [dict(probe="canonical", concept="cat", model_role="edited",
                                             prompt=f"w{worker} r{i}", seed=seed) for seed in range(3)])
                db.record_event("progress", {"worker": worker, "run": i}, run_id)
                db.finish_run(run_id, "done", stats={"worker": worker})
    except BaseException:
        errors.put(f"worker {worker}: {traceback.format_exc()}")


def run_writers(url: str, processes: int = PROCESSES) -> None:
    """Start ``processes`` spawned writers on ``url``, then check every row and event arrived and the chain holds."""
    context = multiprocessing.get_context("spawn")
    start, opened, errors = context.Event(), context.Barrier(processes), context.Queue()
    workers = [context.Process(target=writer, args=(url, n, start, opened, errors)) for n in range(processes)]
    for process in workers:
        process.start()
    start.set()
    for process in workers:
        process.join(timeout=300)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures, "\n".join(failures)
    assert [p.exitcode for p in workers] == [0] * processes

    runs = processes * RUNS_PER_PROCESS
    with open_db(url) as db:
        with db.read_session() as session:
            def count(model, *where):
                return session.scalar(select(func.count()).select_from(model).where(*where))
            assert count(Run, Run.status == "done") == count(Run) == runs
            assert count(Sample) == runs * 3
            assert count(Model) == 1
            assert count(AuditEvent) == runs * EVENTS_PER_RUN + 1  # + the one model.recorded
            seqs = session.scalars(select(AuditEvent.seq).order_by(AuditEvent.seq)).all()
            assert seqs == list(range(1, len(seqs) + 1))
        result = verify_chain(db)
        assert result.ok, result.reason
        assert result.checked == runs * EVENTS_PER_RUN + 1


def test_concurrent_writers_on_sqlite(tmp_path):
    run_writers(f"sqlite:///{tmp_path / 'audit.db'}")


def test_threads_sharing_one_database(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with open_db(f"sqlite:///{tmp_path / 'audit.db'}") as db:
        def work(thread: int) -> None:
            for i in range(10):
                run_id = db.start_run("audit", argv=[str(thread), str(i)])
                db.record_event("progress", {"thread": thread}, run_id)
                db.finish_run(run_id, "done")

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(work, range(4)))
        assert len(db.list_runs(None, status="done")) == 40
        result = verify_chain(db)
        assert result.ok and result.checked == 120
