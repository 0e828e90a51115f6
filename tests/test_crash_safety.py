"""Crash safety: SIGKILL `safeguard apply` and `safeguard probe` at every named crash point and at random
moments, then check that the output folder, the audit database and its hash chain survive, and that running
the command again finishes the job.

The children are real `python -m safeguard` processes (the stand-in judge reaches them as a one-file plugin
through SAFEGUARD_PLUGINS_DIR); recovery runs in this process, where torch is already imported, to keep the
file fast. The helpers above the tests are shared with bench/crash_sweep.py, which runs the full sweep.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

import standin_plugins
from fixtures import tiny_pipeline_dir, tiny_policy_text
from safeguard.faults import CRASH_POINTS

APPLY_POINTS = tuple(p for p in CRASH_POINTS if p.startswith(("apply:", "write:")))
PROBE_POINTS = tuple(p for p in CRASH_POINTS if p.startswith("probe:"))
REPLACE_ONLY_POINTS = ("write:after-move-old",)  # reached only while an earlier output is being replaced
RANDOM_SEED = int(os.environ.get("SAFEGUARD_CRASH_SEED", "20240917"))
CHILD_TIMEOUT_S = 300


# The children load the shared stand-in plugins as a one-file plugin.
STANDIN_PLUGIN = Path(standin_plugins.__file__).read_text()


class CrashCheckFailed(AssertionError):
    """A crash left the model folder or the audit database in a state it must never be in."""


def expect(condition, message: str) -> None:
    if not condition:
        raise CrashCheckFailed(message)


@dataclass
class Tally:
    """Crashes injected (children that really died of SIGKILL) and how many of them were survived."""
    injected: int = 0
    survived: int = 0
    random_kills: int = 0
    finished_before_kill: int = 0

    def line(self) -> str:
        return (f"crashes injected: {self.injected}, survived: {self.survived} "
                f"(random-time kills: {self.random_kills}, children that finished before their kill: "
                f"{self.finished_before_kill})")


TALLY = Tally()


# ---------------------------------------------------------------------------------------------- workspace
@dataclass
class Workspace:
    """A folder with a copy of the tiny model, a policy, a SQLite audit database and the stand-in plugin."""
    root: Path
    out_name: str = "edited"

    @property
    def policy(self) -> Path:
        return self.root / "policy.yaml"

    @property
    def out(self) -> Path:
        return self.root / self.out_name

    @property
    def plugins_dir(self) -> Path:
        return self.root / "plugins"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.root / 'audit.db'}"

    def child_env(self, crash_at: str | None = None) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "SAFEGUARD_CRASH_AT"}
        # One thread per child: the machine is shared, and tiny models gain nothing from threads.
        env.update(SAFEGUARD_DB=self.db_url, SAFEGUARD_PLUGINS_DIR=str(self.plugins_dir), OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        if crash_at:
            env["SAFEGUARD_CRASH_AT"] = crash_at
        return env

    def start_child(self, *args: str, crash_at: str | None = None) -> Child:
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"child-{len(list(logs.iterdir()))}.log"
        with open(log, "wb") as sink:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen([sys.executable, "-m", "safeguard", *args], cwd=self.root,
                                       env=self.child_env(crash_at), stdout=sink, stderr=subprocess.STDOUT)
        return Child(process, log)


@dataclass
class Child:
    """A `python -m safeguard` process whose stdout and stderr go to one log file, readable while it runs."""
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float = CHILD_TIMEOUT_S) -> bool:
        """Poll the log until ``text`` appears (True) or the process ends or time runs out (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            if self.process.poll() is not None:
                return text in self.output()
            time.sleep(0.02)
        return False

    def finish(self) -> tuple[int, str]:
        """Wait for the end; returns (return code, output). A hung child fails: its kill is no injected crash."""
        try:
            self.process.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise CrashCheckFailed(f"the child hung for {CHILD_TIMEOUT_S}s: {self.output()[-2000:]}") from None
        return self.process.returncode, self.output()


def make_workspace(root: Path, model_src: Path, eraser: str = "pure", out_name: str = "edited") -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_src, root / "model")
    write_policy(root, eraser, out_name)
    (root / "plugins").mkdir()
    (root / "plugins" / "standin.py").write_text(STANDIN_PLUGIN)
    return Workspace(root, out_name)


def write_policy(root: Path, eraser: str = "pure", out_name: str = "edited") -> None:
    params = "{steps: 2, seeds: 1}" if eraser == "pure" else "{}"
    (root / "policy.yaml").write_text(tiny_policy_text("crash-safety", eraser=eraser, params=params, out=out_name))


def run_child(ws: Workspace, *args: str, crash_at: str | None = None) -> tuple[int, str]:
    """Run a child to its end; returns (return code, its output)."""
    return ws.start_child(*args, crash_at=crash_at).finish()


# -------------------------------------------------------------------------------------- in-process commands
@contextmanager
def standin_plugin(ws: Workspace):
    """The children's one-file plugin, registered in this process for the duration of a command."""
    from safeguard.plugins import load_plugins, pm

    load_plugins()
    name = f"crash-safety-standin-{id(ws)}"
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), ws.plugins_dir / "standin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pm.register(module, name=name)
    try:
        yield
    finally:
        pm.unregister(name=name)


def safeguard_here(ws: Workspace, *args: str) -> tuple[int, str, str]:
    """Run a safeguard command in this process (click's runner); returns (exit code, stdout, all output)."""
    from click.testing import CliRunner

    from safeguard.cli import cli

    with standin_plugin(ws):
        result = CliRunner().invoke(cli, [*args, "--db", ws.db_url])
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        output += f"\n{type(result.exception).__name__}: {result.exception}"
    return result.exit_code, result.stdout, output


def apply_here(ws: Workspace, *extra: str) -> str:
    code, stdout, output = safeguard_here(ws, "apply", str(ws.policy), *extra)
    expect(code == 0, f"apply failed (exit {code}): {output[-2000:]}")
    return re.search(r"^run (\S+): wrote", stdout, re.M).group(1)


# ------------------------------------------------------------------------------------------------- checks
def check_database(ws: Workspace):
    """The database opens, SQLite finds no corruption and the hash chain verifies; returns it open."""
    from sqlalchemy import text

    from safeguard.integrity import verify_chain
    from safeguard.db import open_db

    db = open_db(ws.db_url)
    with db.read_session() as session:
        integrity = session.execute(text("PRAGMA integrity_check")).scalar()
    expect(integrity == "ok", f"PRAGMA integrity_check: {integrity}")
    chain = verify_chain(db)
    expect(chain.ok, f"audit chain broken: {chain.reason}")
    return db


def check_complete_model(folder: Path, expected_files: list | None = None) -> list:
    """A whole model: model_index.json, loadable by DiffusionPipeline, and (given) exactly the recorded files."""
    from safeguard.db import model_file_list
    from safeguard.modelio import hash_model_folder, load_pipeline

    expect((folder / "model_index.json").exists(), f"{folder}: model_index.json is missing (partial model)")
    try:
        load_pipeline(folder)
    except Exception as exc:  # a truncated or missing weight file shows up here
        raise CrashCheckFailed(f"{folder}: not loadable: {exc}") from None
    files = model_file_list(hash_model_folder(folder).files)
    if expected_files is not None:
        expect(files == model_file_list(expected_files), f"{folder}: files differ from the recorded model")
    return files


def leftovers(ws: Workspace) -> list[Path]:
    parent, name = ws.out.parent, glob.escape(ws.out.name)
    return sorted([*parent.glob(f".{name}.partial-*"), *parent.glob(f".{name}.old-*")])


def output_state(ws: Workspace, old_files: list | None, killed_run_id: str | None) -> str:
    """What the output path holds: 'absent', 'old' (the earlier output, file for file) or 'new' (the killed
    run's complete output). Anything else, a partial or foreign folder, fails."""
    from safeguard.modelio import read_edit_record

    if not ws.out.exists():
        return "absent"
    files = check_complete_model(ws.out)
    if old_files is not None and files == old_files:
        return "old"
    record = read_edit_record(ws.out) or {}
    expect(killed_run_id is not None and record.get("run_id") == killed_run_id,
           f"{ws.out} holds a complete model that is neither the earlier output nor the killed run's")
    return "new"


def recorded_output(db, run_id: str) -> dict:
    return next(m for m in db.run_models(run_id) if m["role"] == "output")


def earlier_output_files(ws: Workspace) -> list:
    """Apply once, to completion, and return the files recorded for its output."""
    from safeguard.db import model_file_list, open_db

    run_id = apply_here(ws)
    with open_db(ws.db_url) as db:
        return model_file_list(recorded_output(db, run_id)["files"])


def run_ids(ws: Workspace) -> set[str]:
    from safeguard.db import open_db

    with open_db(ws.db_url) as db:
        return {r["id"] for r in db.list_runs(None)}


def new_runs(db, before: set[str], kind: str) -> list[dict]:
    return [r for r in db.list_runs(None, kind=kind) if r["id"] not in before]


def check_killed_run(runs: list[dict], *, must_exist: bool, may_be_done: bool = False) -> str | None:
    """The killed command's run is visible and unfinished ('done' only for a kill that may land after the
    final commit); returns its id."""
    expect(len(runs) <= 1, f"one command started {len(runs)} runs")
    if not runs:
        expect(not must_exist, "the killed command left no run row")
        return None
    allowed = ("running", "failed", "done") if may_be_done else ("running", "failed")
    expect(runs[0]["status"] in allowed, f"the killed run is {runs[0]['status']!r}")
    return runs[0]["id"]


def check_rerun_apply(ws: Workspace) -> None:
    """Running apply again finishes: a 'done' run, its recorded model on disk, no temporary folders left."""
    run_id = apply_here(ws)
    db = check_database(ws)
    expect(db.get_run(run_id)["status"] == "done", "the re-run did not finish as 'done'")
    check_complete_model(ws.out, recorded_output(db, run_id)["files"])
    expect(not leftovers(ws), f"temporary folders left beside the output: {leftovers(ws)}")
    db.close()


# ------------------------------------------------------------------------------------------------ scenarios
@dataclass
class Outcome:
    scenario: str  # "apply-fresh", "apply-replace", "probe" or "random"
    point: str  # the crash point, or "t+<seconds>" for a random-time kill
    returncode: int
    killed: bool
    state_after_kill: str = ""
    state_after_cleanup: str = ""
    notes: list[str] = field(default_factory=list)


def expected_output_states(point: str, replacing: bool) -> tuple[str, str]:
    """(right after the kill, after the next run's clean_partial_outputs) for a named apply crash point."""
    if point == "apply:after-rename":
        return "new", "new"
    if not replacing:
        return "absent", "absent"
    return ("absent" if point == "write:after-move-old" else "old"), "old"


def _injected(outcome: Outcome) -> None:
    if outcome.killed:
        TALLY.injected += 1
        TALLY.random_kills += outcome.scenario == "random"


def _survived(outcome: Outcome) -> None:
    if outcome.killed:  # called only once every check after the kill has passed
        TALLY.survived += 1


def kill_apply_at(ws: Workspace, point: str, *, replacing: bool) -> Outcome:
    """Kill `safeguard apply` at ``point`` (over an earlier output if ``replacing``), check, recover."""
    from safeguard.modelio import clean_partial_outputs

    old_files = earlier_output_files(ws) if replacing else None
    before = run_ids(ws)
    code, log = run_child(ws, "apply", str(ws.policy), crash_at=point)
    outcome = Outcome("apply-replace" if replacing else "apply-fresh", point, code, code == -signal.SIGKILL)
    if not replacing and point in REPLACE_ONLY_POINTS:
        # Nothing to move aside, so the point is never reached: the child must simply succeed.
        expect(code == 0, f"apply without an earlier output failed (exit {code}): {log[-2000:]}")
        outcome.notes.append("point only reached when replacing; the child completed")
        check_rerun_apply(ws)
        return outcome
    expect(outcome.killed, f"crash point {point} was never reached (exit {code}): {log[-2000:]}")
    _injected(outcome)
    db = check_database(ws)
    killed_run = check_killed_run(new_runs(db, before, "apply"), must_exist=True)
    wanted_now, wanted_later = expected_output_states(point, replacing)
    outcome.state_after_kill = output_state(ws, old_files, killed_run)
    expect(outcome.state_after_kill == wanted_now,
           f"after the kill the output is {outcome.state_after_kill}, not {wanted_now}")
    clean_partial_outputs(ws.out)  # what the next run does first
    outcome.state_after_cleanup = output_state(ws, old_files, killed_run)
    expect(outcome.state_after_cleanup == wanted_later,
           f"after clean_partial_outputs the output is {outcome.state_after_cleanup}, not {wanted_later}")
    db.close()
    check_rerun_apply(ws)
    _survived(outcome)
    return outcome


def kill_probe_at(ws: Workspace, point: str) -> Outcome:
    """Kill `safeguard probe` at ``point``, check, then `probe --resume` and check nothing was lost or doubled."""
    from safeguard.probing import verify_model_files

    apply_id = apply_here(ws)
    before = run_ids(ws)
    code, log = run_child(ws, "probe", apply_id, crash_at=point)
    outcome = Outcome("probe", point, code, code == -signal.SIGKILL)
    expect(outcome.killed, f"crash point {point} was never reached (exit {code}): {log[-2000:]}")
    _injected(outcome)
    db = check_database(ws)
    probe_id = check_killed_run(new_runs(db, before, "probe"), must_exist=True)
    for model in db.run_models(apply_id):
        verify_model_files(db, model, model["role"])  # a probe never touches the models
    kept = {s["id"] for s in db.samples(probe_id)}
    if point != "probe:after-run-row":
        expect(kept, f"no samples were recorded before the kill at {point}")
    db.close()
    code, _, output = safeguard_here(ws, "probe", probe_id, "--resume")
    expect(code == 0, f"probe --resume failed (exit {code}): {output[-2000:]}")
    db = check_database(ws)
    after = db.samples(probe_id)
    keys = [(s["probe"], s["concept"], s["model_role"], s["prompt"], s["seed"]) for s in after]
    expect(len(set(keys)) == len(keys), "the resumed probe recorded a sample twice")
    expect(kept <= {s["id"] for s in after}, "the resumed probe lost samples recorded before the kill")
    expect(db.get_run(probe_id)["status"] == "done", "the resumed probe did not finish as 'done'")
    expect(db.probe_results(probe_id), "the resumed probe recorded no results")
    outcome.notes.append(f"{len(kept)} samples before the kill, {len(after)} after resume")
    db.close()
    _survived(outcome)
    return outcome


@dataclass(frozen=True)
class RandomKill:
    """SIGKILL ``delay_s`` after the child starts, or after ``anchor`` appears in its output."""
    delay_s: float
    anchor: str | None = None
    replacing: bool = True

    @property
    def label(self) -> str:
        return f"{'start' if self.anchor is None else repr(self.anchor)}+{self.delay_s:.2f}s"


EDIT_STARTED = "erasing"  # apply prints "... erasing N concept(s) with ..." once the model is loaded


def kill_apply_randomly(ws: Workspace, kill: RandomKill) -> Outcome:
    """SIGKILL `safeguard apply` at a moment nobody chose, wherever it is; check, recover."""
    from safeguard.modelio import clean_partial_outputs

    old_files = earlier_output_files(ws) if kill.replacing else None
    if not kill.replacing and ws.out.exists():
        shutil.rmtree(ws.out)
    before = run_ids(ws)
    child = ws.start_child("apply", str(ws.policy))
    if kill.anchor is None or child.wait_for(kill.anchor):
        time.sleep(kill.delay_s)
    if child.process.poll() is None:
        os.kill(child.process.pid, signal.SIGKILL)
    code, log = child.finish()
    outcome = Outcome("random", kill.label, code, code == -signal.SIGKILL)
    expect(code in (0, -signal.SIGKILL), f"apply died with exit {code}: {log[-2000:]}")
    _injected(outcome)
    db = check_database(ws)
    runs = new_runs(db, before, "apply")
    killed_run = check_killed_run(runs, must_exist=False, may_be_done=True)
    if runs and runs[0]["status"] == "done":  # finished, or killed after the final commit
        check_complete_model(ws.out, recorded_output(db, killed_run)["files"])
    outcome.state_after_kill = output_state(ws, old_files, killed_run)
    clean_partial_outputs(ws.out)  # what the next run does first
    outcome.state_after_cleanup = output_state(ws, old_files, killed_run)
    if kill.replacing:
        expect(outcome.state_after_cleanup in ("old", "new"), "the earlier output was lost")
    outcome.notes.append(_random_kill_note(outcome, runs))
    db.close()
    check_rerun_apply(ws)
    _survived(outcome)
    return outcome


def kill_apply_randomly_until_killed(ws: Workspace, kill: RandomKill, attempts: int = 4) -> Outcome:
    """``kill_apply_randomly``, halving the delay while the child keeps finishing first (it can run faster
    than the timed run, which also created the database)."""
    for _ in range(attempts - 1):
        outcome = kill_apply_randomly(ws, kill)
        if outcome.killed:
            return outcome
        kill = replace(kill, delay_s=round(kill.delay_s / 2, 2))
    return kill_apply_randomly(ws, kill)


def _random_kill_note(outcome: Outcome, runs: list[dict]) -> str:
    if not outcome.killed:
        TALLY.finished_before_kill += 1
        return "finished before the kill"
    if not runs:
        return "killed before the run row was written"
    return f"killed with the run {runs[0]['status']}"


@dataclass(frozen=True)
class ChildTiming:
    lifetime_s: float  # start to exit
    edit_to_exit_s: float  # from EDIT_STARTED in the output to exit: load done, edit + write + record left


def time_child_apply(ws: Workspace) -> ChildTiming:
    """Time one uninterrupted `python -m safeguard apply` here, which must succeed."""
    started = time.perf_counter()
    child = ws.start_child("apply", str(ws.policy))
    child.wait_for(EDIT_STARTED)
    edit_started = time.perf_counter()
    code, log = child.finish()
    expect(code == 0 and EDIT_STARTED in log, f"uninterrupted apply failed (exit {code}): {log[-2000:]}")
    ended = time.perf_counter()
    return ChildTiming(ended - started, ended - edit_started)


def random_kills(count: int, timing: ChildTiming, seed: int = RANDOM_SEED) -> list[RandomKill]:
    """Seeded kill moments: every other one anywhere in the child's life (start-up, imports, load), the rest
    in its short last stretch (edit, write, rename, record), where a kill is most likely to hurt; outputs
    alternate between replacing an earlier model and writing a fresh one, two kills each."""
    rng = random.Random(seed)
    kills = []
    for i in range(count):
        replacing = (i // 2) % 2 == 0
        if i % 2 == 0:
            kills.append(RandomKill(round(rng.uniform(0.0, 0.8) * timing.edit_to_exit_s, 2), EDIT_STARTED, replacing))
        else:
            kills.append(RandomKill(round(rng.uniform(0.05, 0.85) * timing.lifetime_s, 2), None, replacing))
    return kills


# -------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module", autouse=True)
def crash_summary(request):
    """Print the crash tally once the module is done (shown even without -s)."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\ncrash safety: {TALLY.line()}")


@pytest.fixture
def ws(tmp_path, tiny_pipeline_root):
    return make_workspace(tmp_path / "ws", tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root))


def test_sampled_points_cover_every_crash_point():
    assert set(APPLY_POINTS) | set(PROBE_POINTS) == set(CRASH_POINTS)
    assert set(REPLACE_ONLY_POINTS) <= set(APPLY_POINTS)


@pytest.mark.parametrize("point", [p for p in APPLY_POINTS if p not in REPLACE_ONLY_POINTS])
def test_apply_killed_at_crash_point(ws, point):
    outcome = kill_apply_at(ws, point, replacing=False)
    print(f"{point}: killed, output {outcome.state_after_kill} after the kill; re-run done")


@pytest.mark.parametrize("point", REPLACE_ONLY_POINTS)
def test_apply_killed_while_replacing_an_earlier_output(tmp_path, tiny_pipeline_root, point):
    # Brackets in the name: the leftovers must be found by name, not read as a glob character class.
    ws = make_workspace(tmp_path / "ws", tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), out_name="edited[v2]")
    outcome = kill_apply_at(ws, point, replacing=True)
    # Killed between the two renames the path is empty, and the next run puts the earlier model back.
    assert (outcome.state_after_kill, outcome.state_after_cleanup) == ("absent", "old")
    print(f"{point}: killed while replacing; earlier model restored, re-run done")


@pytest.mark.parametrize("point", PROBE_POINTS)
def test_probe_killed_at_crash_point_resumes(ws, point):
    outcome = kill_probe_at(ws, point)
    print(f"{point}: killed; {'; '.join(outcome.notes)}")


def test_apply_killed_at_random_times(ws):
    timing = time_child_apply(ws)  # also leaves an earlier output for the first replacing kill
    outcomes = [kill_apply_randomly_until_killed(ws, kill) for kill in random_kills(3, timing)]
    assert all(o.killed for o in outcomes), "a child kept finishing before its kill"
    for o in outcomes:
        print(f"seed {RANDOM_SEED}, kill at {o.point} (apply takes ~{timing.lifetime_s:.1f}s): rc {o.returncode}, "
              f"output {o.state_after_kill} -> {o.state_after_cleanup}, {'; '.join(o.notes)}")


def test_failing_eraser_leaves_failed_run_and_no_output(ws):
    write_policy(ws.root, eraser="exploding")
    code, _, output = safeguard_here(ws, "apply", str(ws.policy))
    assert code != 0, output
    db = check_database(ws)
    [run] = db.list_runs(None, kind="apply")
    assert run["status"] == "failed"
    assert run["error"] == "RuntimeError: eraser blew up mid-edit"
    finished = db.list_events(run["id"])[-1]
    assert finished["event"] == "run.finished" and finished["payload"]["error"] == run["error"]
    assert not ws.out.exists() and not leftovers(ws)


def test_two_applies_at_once_share_one_database(ws):
    children = [ws.start_child("apply", str(ws.policy), "--out", str(ws.root / f"edited-{n}")) for n in (1, 2)]
    for code, log in [child.finish() for child in children]:
        assert code == 0, log[-2000:]
        assert "database is locked" not in log
    db = check_database(ws)
    runs = db.list_runs(None, kind="apply")
    assert [r["status"] for r in runs] == ["done", "done"]
    for run in runs:
        output = recorded_output(db, run["id"])
        check_complete_model(Path(output["path"]), output["files"])
    first, second = sorted(runs, key=lambda r: r["started_at"])
    print(f"runs overlapped in time: {second['started_at'] < first['finished_at']}")
