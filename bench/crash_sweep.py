"""The full crash sweep: SIGKILL `safeguard apply` at every apply/write crash point on a fresh and on a replaced
output, `safeguard probe` at every probe crash point, and apply at N seeded random moments; after each kill check
the output folder, the audit database and its chain, then recover. Prints a table and the totals, and exits 1
unless every injected crash was survived.

    python bench/crash_sweep.py [N] [--seed SEED]     # N random-time kills, default 20

The checks are the ones tests/test_crash_safety.py runs on a sample of these scenarios.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import test_crash_safety as harness  # noqa: E402  (tests/ is put on the path just above)
from fixtures import tiny_pipeline_dir  # noqa: E402


def scenarios():
    """(label, point, function taking a workspace) for every named crash point and mode."""
    for point in harness.APPLY_POINTS:
        for replacing in (False, True):
            yield ("apply-replace" if replacing else "apply-fresh", point,
                   lambda ws, p=point, r=replacing: harness.kill_apply_at(ws, p, replacing=r))
    for point in harness.PROBE_POINTS:
        yield "probe", point, lambda ws, p=point: harness.kill_probe_at(ws, p)


def run_named(root: Path, model: Path) -> list[dict]:
    rows = []
    for n, (label, point, kill) in enumerate(scenarios()):
        ws = harness.make_workspace(root / f"named-{n}", model)
        rows.append(attempt(label, point, lambda: kill(ws)))
    return rows


def run_random(root: Path, model: Path, count: int, seed: int) -> list[dict]:
    ws = harness.make_workspace(root / "random", model)
    timing = harness.time_child_apply(ws)  # also leaves an earlier output to replace
    print(f"uninterrupted apply takes {timing.lifetime_s:.1f}s here, {timing.edit_to_exit_s:.1f}s of it after the "
          f"model is loaded; {count} kills seeded with {seed}", flush=True)
    return [attempt("random", kill.label, lambda k=kill: harness.kill_apply_randomly_until_killed(ws, k))
            for kill in harness.random_kills(count, timing, seed)]


def attempt(label: str, point: str, kill) -> dict:
    started = time.perf_counter()
    try:
        outcome = kill()
        row = {"scenario": label, "point": outcome.point, "rc": outcome.returncode, "killed": outcome.killed,
               "output": f"{outcome.state_after_kill or '-'} -> {outcome.state_after_cleanup or '-'}",
               "result": "survived" if outcome.killed else "not killed", "notes": "; ".join(outcome.notes)}
    except Exception as exc:  # a failed check, or the harness itself: either way this crash was not survived
        row = {"scenario": label, "point": point, "rc": "?", "killed": None, "output": "?", "result": "FAILED",
               "notes": f"{type(exc).__name__}: {exc}".splitlines()[0][:160]}
        traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - started, 1)
    print_row(row)
    return row


COLUMNS = (("scenario", 13), ("point", 24), ("rc", 4), ("output", 17), ("result", 10), ("seconds", 7), ("notes", 0))


def print_row(row: dict) -> None:
    print("  ".join(f"{row[name]!s:<{width}}" if width else str(row[name]) for name, width in COLUMNS), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=20, help="random-time kills (default 20)")
    parser.add_argument("--seed", type=int, default=harness.RANDOM_SEED)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # tiny models; the children run single-threaded too
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="safeguard-crash-sweep-") as tmp:
        root = Path(tmp)
        model = tiny_pipeline_dir("sd1-bert", root / "tiny")
        print("  ".join(f"{name:<{width}}" if width else name for name, width in COLUMNS))
        rows = run_named(root, model) + run_random(root, model, args.n, args.seed)
    tally = harness.TALLY
    failed = [r for r in rows if r["result"] == "FAILED"]
    print(f"\n{len(rows)} scenarios in {time.perf_counter() - started:.0f}s; {len(failed)} failed")
    print(f"crashes injected: {tally.injected}, survived: {tally.survived} (random-time kills: {tally.random_kills}, "
          f"children that finished before their kill: {tally.finished_before_kill})")
    return 1 if failed or tally.injected != tally.survived else 0


if __name__ == "__main__":
    sys.exit(main())
