"""Data-parallel probing on Hugging Face ``accelerate``: ``accelerate launch -m safeguard probe RUN``.

Every process of a launch runs the same probe loop. Whatever needs one answer (the database, the probe cases,
the apply of ``audit``) is computed by the main process and broadcast; the renders and judgements of a
sampling round are cut into units (one pipeline batch each, in the order one process would do them), and
process ``r`` of ``n`` does units ``r, r + n, r + 2n, ...``. After each step of ``n`` units every process gets
every new sample, in unit order, so the sequential decision after a round sees the same samples on every
process, and the database holds them in the order a single process would have written them.

One writer: only the main process writes to the audit database and the evidence folder it belongs to. It
records its own unit before it waits for the others, and every other process keeps the samples of a unit it
finished in a pending file (``<evidence>/pending/<run>/``) until the main process has recorded them, so a
process that dies loses only its unfinished unit; ``probe --resume`` merges pending files in one transaction
and renders only what is missing. With one process (no launcher) nothing here runs any collective.

The object traffic goes through a gloo group beside accelerate's own process group, so it is the same on
CPUs (gloo), one machine's GPUs and several machines (NCCL for accelerate's group). On GPUs each process
computes on its own device (``cuda:<local rank>``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable

from .errors import SafeguardError

TIMEOUT_ENV = "SAFEGUARD_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 6 * 3600  # the main process may compute alone this long (an attack, an apply) while the others wait
_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
PENDING = "pending"


class PeerLost(BaseException):
    """Another process of the launch stopped, or the processes went out of step. Not an ``Exception``: a probe
    must not record it as its own failure and carry on; the run ends failed, to be resumed."""


def launched_size() -> int:
    """The number of processes the launcher started (1 without one)."""
    for name in _SIZE_ENV:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


class Team:
    """The processes of one launch: ``rank`` of ``size``; rank 0 is the main process, the one writer."""

    def __init__(self, rank: int = 0, size: int = 1, group=None, device: str | None = None):
        self.rank, self.size, self.group, self.device = rank, size, group, device
        self.broken: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def stats(self) -> dict:
        return {"processes": self.size}

    # ---------------------------------------------------------------------------------------- collectives
    def _collective(self, what: str, fn):
        if self.broken:
            raise PeerLost(self.broken)
        try:
            return fn()
        except PeerLost:
            raise
        except Exception as exc:  # a peer died or timed out: every later collective would fail the same way
            self.broken = (f"process {self.rank}: another process of the launch stopped during {what} "
                           f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
                           "resume the run with 'safeguard probe --resume RUN'")
            raise PeerLost(self.broken) from exc

    def _broadcast(self, obj, what: str):
        import torch.distributed as dist

        def send():
            box = [obj]
            dist.broadcast_object_list(box, src=0, group=self.group)
            return box[0]
        return self._collective(what, send)

    def _all_gather(self, obj, what: str) -> list:
        import torch.distributed as dist

        def gather():
            out = [None] * self.size
            dist.all_gather_object(out, obj, group=self.group)
            return out
        return self._collective(what, gather)

    def _gather_main(self, obj, what: str) -> list | None:
        import torch.distributed as dist

        def gather():
            out = [None] * self.size if self.is_main else None
            dist.gather_object(obj, out, dst=0, group=self.group)
            return out
        return self._collective(what, gather)

    def barrier(self, what: str = "a barrier") -> None:
        if self.size > 1:
            self._all_gather(None, what)

    def on_main(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` computed by the main process; every process returns its result or raises its exception.
        Tensors reach the other processes on the CPU. ``what`` names the call: processes that reach
        different calls are out of step, and stop."""
        if self.size == 1:
            return fn()
        if self.is_main:
            if self.broken:  # the others are gone: the main process finishes (e.g. marks the run failed) alone
                return fn()
            try:
                value = fn()
            except Exception as exc:
                self._broadcast((what, False, _portable_error(exc)), what)
                raise
            self._broadcast((what, True, _to_cpu(value)), what)
            return value
        name, ok, value = self._broadcast(None, what)
        if name != what:
            self.broken = (f"process {self.rank} reached {what} while the main process reached {name}: the processes "
                           "are out of step; resume the run with 'safeguard probe --resume RUN'")
            raise PeerLost(self.broken)
        if not ok:
            raise value
        return value

    # ------------------------------------------------------------------------------------- the database
    def open_db(self, url: str | None = None):
        """The audit database: the real one with one process; with several, a :class:`SharedDatabase` whose
        calls the main process alone makes (the others never open the database)."""
        from .db import open_db

        if self.size == 1:
            return open_db(url)
        opened: dict = {}
        self.on_main(lambda: opened.update(db=open_db(url)), "open the audit database")
        return SharedDatabase(self, opened.get("db"))

    def lead(self, db) -> bool:
        """End of the shared part of a probe: True on the main process, which goes on alone with ``db``."""
        if self.size > 1:
            self.barrier("the end of probing")
            if isinstance(db, SharedDatabase):
                db.detach()
        return self.is_main

    # ------------------------------------------------------------------------------------------- samples
    def run_units(self, units: list, work: Callable[[Any], list[tuple[dict, bytes]]],
                  record: Callable[[list[dict]], Any], evidence_dir: Path, run_id: str,
                  progress: Callable[[int], Any] | None = None) -> list[dict]:
        """Do ``work(unit)`` for every unit, shared between the processes; every process returns every new
        sample row, in unit order. ``work`` returns (row, PNG bytes) pairs; the main process stores the images
        in ``evidence_dir`` and ``record``s the rows (one call per unit with one process, per step with several);
        ``progress(n)`` hears, on the main process, the number of samples each step added."""
        from .probing import store_png

        def commit(pairs):
            for row, png in pairs:
                store_png(png, evidence_dir)
            if pairs:
                record([row for row, _ in pairs])

        if self.size == 1:
            rows = []
            for unit in units:
                pairs = work(unit)
                commit(pairs)
                rows += [row for row, _ in pairs]
                if progress is not None:
                    progress(len(pairs))
            return rows
        rows, spooled = [], []
        for start in range(0, len(units), self.size):
            index = start + self.rank
            pairs, error = [], None
            if index < len(units):
                try:
                    pairs = work(units[index])
                except Exception as exc:
                    error = f"process {self.rank}: {type(exc).__name__}: {exc}"
            if error is None and pairs:
                if self.is_main:
                    commit(pairs)  # before waiting for the others: its own samples survive their death
                else:
                    spooled.append(_spool(pairs, evidence_dir, run_id, self.rank))
            step_rows = self._all_gather((error, [row for row, _ in pairs]), "a sampling step")
            images = self._gather_main([png for _, png in pairs] if not self.is_main else None, "a sampling step")
            errors = [e for e, _ in step_rows if e]
            if self.is_main:
                others = [pair for (_, r), p in list(zip(step_rows, images))[1:] for pair in zip(r, p or [])]
                commit(others)
            if errors:
                raise RuntimeError("; ".join(errors))
            rows += [row for _, r in step_rows for row in r]
            if progress is not None and self.is_main:
                progress(sum(len(r) for _, r in step_rows))
        self.barrier("the end of a sampling round")  # the main process has recorded every spooled sample
        for path in spooled:
            path.unlink(missing_ok=True)
        return rows

    def recover(self, db, run_id: str, evidence_dir: Path) -> int:
        """Main process: record the samples other processes finished before a launch died (pending files of
        ``run_id``), in one transaction, and remove the files; returns how many were new."""
        if not self.is_main:
            return 0
        return merge_pending(local_db(db), run_id, evidence_dir)


def _portable_error(exc: Exception) -> Exception:
    """``exc`` if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _to_cpu(obj):
    """A copy of ``obj`` whose tensors are on the CPU (lists, tuples, dicts and dataclasses are walked)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        items = [_to_cpu(v) for v in obj]
        return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _to_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


class SharedDatabase:
    """The audit database as every process of a launch sees it: the main process makes each call and every
    process gets its result (or its exception). Only method calls are shared; ``detach`` ends the sharing
    (the main process then calls the database directly)."""

    def __init__(self, team: Team, db):
        self._team, self._db, self._shared = team, db, True

    @property
    def local(self):
        """The database itself on the main process, None on the others."""
        return self._db

    def detach(self) -> None:
        self._shared = False

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if not self._shared:
            if self._db is None:
                raise AttributeError(f"only the main process uses the audit database ({name})")
            return getattr(self._db, name)

        def call(*args, **kwargs):
            return self._team.on_main(lambda: getattr(self._db, name)(*args, **kwargs), f"db.{name}")
        return call


def local_db(db):
    """The database a process writes to directly (the main process's own under a launch)."""
    return db.local if isinstance(db, SharedDatabase) else db


# ----------------------------------------------------------------------------------------- pending files
def _pending_dir(evidence_dir: Path, run_id: str) -> Path:
    return Path(evidence_dir) / PENDING / run_id


def _spool(pairs: list[tuple[dict, bytes]], evidence_dir: Path, run_id: str, rank: int) -> Path:
    """Keep a finished unit's samples (images in the evidence folder, rows in a pending file) until the main
    process has recorded them."""
    from .files import write_atomically
    from .probing import store_png

    for _, png in pairs:
        store_png(png, evidence_dir)
    rows = [row for row, _ in pairs]
    text = json.dumps(rows, sort_keys=True)
    name = f"{rank}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    path = _pending_dir(evidence_dir, run_id) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text)
    return path


def merge_pending(db, run_id: str, evidence_dir: Path) -> int:
    """Record the rows of ``run_id``'s pending files whose image is in the evidence folder with its recorded
    sha256, all in one ``add_samples`` call (one transaction), then remove the files; returns how many rows
    were new. A row whose image is missing or differs is dropped: its sample is rendered again."""
    from .files import sha256_file

    folder = _pending_dir(evidence_dir, run_id)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        return 0
    rows = []
    for path in files:
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # files are written whole (atomic rename); anything else is not ours
        for row in loaded if isinstance(loaded, list) else []:
            image = row.get("image_path") if isinstance(row, dict) else None
            path_of = Path(evidence_dir) / image if image else None
            if path_of is not None and path_of.is_file() and sha256_file(path_of) == row.get("image_sha256"):
                rows.append(row)
    added = db.add_samples(run_id, rows) if rows else 0
    for path in files:
        path.unlink(missing_ok=True)
    return added


# ------------------------------------------------------------------------------------------------ setup
_team: Team | None = None


def team() -> Team:
    """The processes of this launch, joined on first use (after the CLI has set ``--device``)."""
    global _team
    if _team is None:
        _team = _join()
    return _team


def _join() -> Team:
    from . import runtime

    size = launched_size()
    if size <= 1:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and os.environ.get("MASTER_ADDR"):
            raise SafeguardError("accelerate launch --cpu starts one process unless it runs under mpirun",
                                 field="accelerate launch --cpu --num_processes",
                                 fix="launch several CPU processes with 'accelerate launch --multi_gpu --num_processes N "
                                     "-m safeguard --device cpu ...' (torchrun), or give --mpirun_hostfile")
        return Team()
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    try:
        from accelerate import PartialState
    except ImportError:
        raise SafeguardError("a multi-process launch needs the accelerate package", field="accelerate launch",
                             fix="pip install accelerate") from None
    device = runtime.current().device
    if device.startswith("cuda:"):
        raise SafeguardError(f"--device {device} would put every process of the launch on one GPU",
                             field="--device", fix="use --device auto or cuda (each process takes the GPU of its local rank)")
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))
    state = PartialState(cpu=cpu, timeout=timeout)
    if state.num_processes <= 1:
        return Team()
    placed = None
    if not cpu and state.device.type == "cuda":
        placed = f"cuda:{state.local_process_index}"
        torch.cuda.set_device(state.local_process_index)
        runtime.configure(device=placed)
    elif cpu:
        runtime.configure(device="cpu")
    group = dist.new_group(backend="gloo", timeout=timeout)
    import atexit

    atexit.register(_leave)
    return Team(state.process_index, state.num_processes, group, placed or "cpu")


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - at exit, a peer may already be gone
            pass


def reset() -> None:
    """Forget the joined team (tests)."""
    global _team
    _team = None
