"""Probe throughput with 1 and N data-parallel processes (`accelerate launch`, CPU, one thread each) on the
tiny Stable Diffusion pipeline of tests/fixtures.py, and the scaling efficiency, measured in one run:

    OMP_NUM_THREADS=1 python bench/scaling.py --processes 2

Both runs probe the same apply run, so they render the same images (the script checks the recorded samples
are equal); throughput is recorded images (both models) per second of the probe run's own time (models
loaded, rendered, judged and recorded; process start-up is reported apart). Efficiency is
throughput(N) / (N * throughput(1)).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import test_crash_safety as harness  # noqa: E402  (tests/ is put on the path just above)
import test_distributed as launcher  # noqa: E402
from fixtures import tiny_pipeline_dir, tiny_policy_text  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="processes of the parallel run (default 2)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per image (default 8)")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="seeds per prompt and round (default 4)")
    parser.add_argument("--max-images", type=int, default=32, help="image budget per probe group (default 32)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per pipeline call (default 2)")
    args = parser.parse_args()

    from safeguard.db import open_db

    root = Path(tempfile.mkdtemp(prefix="safeguard-scaling-"))
    ws = harness.make_workspace(root / "ws", tiny_pipeline_dir("sd1", root / "tiny"))
    probes = (f"  images_per_prompt: {args.images_per_prompt}\n  batch_size: {args.batch_size}\n"
              f"  max_images: {args.max_images}\n")
    text = tiny_policy_text("scaling", judge="pixel").replace("  images_per_prompt: 1\n", probes)
    text = text.replace("  steps: 2\n", f"  steps: {args.steps}\n").replace("max_leakage: 0.8", "max_leakage: 0.5")
    ws.policy.write_text(text)
    apply_run = harness.apply_here(ws)
    db = open_db(ws.db_url)
    measured = {}
    for n in (1, args.processes):
        started = time.perf_counter()
        result = launcher._launch(ws, "probe", apply_run, processes=n)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            print(f"{n} process(es) failed:\n{result.stderr[-3000:]}", file=sys.stderr)
            return 1
        run_id = launcher._probe_run(result)
        seconds = db.get_run(run_id)["stats"]["seconds"]
        images = len(db.samples(run_id))
        measured[n] = {"run": run_id, "images": images, "probe_seconds": seconds, "wall_seconds": round(wall, 2),
                       "images_per_second": round(images / seconds, 3)}
    one, many = measured[1], measured[args.processes]
    same = launcher._evidence(db, one["run"]) == launcher._evidence(db, many["run"])
    efficiency = many["images_per_second"] / (args.processes * one["images_per_second"])
    print(json.dumps({"processes": measured, "speedup": round(many["images_per_second"] / one["images_per_second"], 3),
                      "efficiency": round(efficiency, 3), "evidence_equal": same}, indent=2))
    for n, m in measured.items():
        print(f"{n} process(es): {m['images']} images in {m['probe_seconds']}s = {m['images_per_second']} images/s "
              f"(wall {m['wall_seconds']}s with start-up)")
    print(f"scaling efficiency with {args.processes} processes: {efficiency:.2f}; evidence equal: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
