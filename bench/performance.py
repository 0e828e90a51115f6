"""Where the time and memory go, as ratios measured in one run on one model:

    python bench/performance.py [--model embedded|sd15|sdxl|pixart|FOLDER] [--policy policies/demo.yaml]
                                [--size PX] [--concepts 1,5,10,20,50,100] [--probe-prompts 4] [--probe-images 2]
                                [--device auto] [--dtype auto] [--skip scaling,...]

1. PURE edit against its floor: the edit's seconds (capture, solve, weight update) against replaying, through
   the bare denoiser with its default attention, exactly the denoiser calls the capture made (same count, same
   batches, the same input tensors). Target: <= 1.25x.
2. Capture peak memory against plain inference: the process's peak during a capture call against the same
   pipeline call without capture (same prompts, steps, size; output_type="latent"), both with the loaded model;
   what each adds above the model is shown too. CPU: RSS sampled every 2 ms; CUDA: torch's allocated bytes.
   Target: <= 1.1x.
3. Probe generation against the bare diffusers pipeline: images per second of safeguard's renderer
   (``safeguard.probing.render``) against ``pipe(prompt=[...], generator=[...])`` in the same batches. Target:
   >= 0.9x.
4. UCE edit time on the same policy.
5. Scaling: PURE edit seconds for 1, 5, 10, 20, 50, 100 concepts (the policy's first concepts, then synthetic
   ones with the same templates and one neighbour each), with the least-squares line through them and how far
   the largest is from it. Target on the embedded model: 100 concepts in under 5 minutes on a CPU, linear.

``--model sd15|sdxl|pixart`` builds the real-size architecture with random weights from config
(tests/realsize.py; memory: 4, 14 and 4 GB); ``--size`` sets the capture and probe resolution (default: the
model's native size; 64 keeps real-size models quick on a CPU). Sections run in order on one loaded model, its
weights restored between edits; nothing is written except the real-size model's temporary folder.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

SECTIONS = ("floor", "memory", "probe", "uce", "scaling")


# ------------------------------------------------------------------------------------------------- memory
def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def in_use(device) -> int:
    import torch

    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss()


def peak_memory(fn, device) -> tuple[int, object]:
    """Bytes ``fn()`` adds at its peak above what was in use before it, and its result."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    before = _rss()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss())
    return peak[0] - before, result


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------------------------- model
def load_model(name: str):
    from safeguard.modelio import load_pipeline

    if name in ("sd15", "sdxl", "pixart"):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from realsize import save_realsize

        folder = Path(tempfile.mkdtemp(prefix=f"safeguard-bench-{name}-")) / "model"
        print(f"building a real-size {name} with random weights in {folder} ...", flush=True)
        save_realsize(name, folder)
        return load_pipeline(folder)
    return load_pipeline("embedded:world-v1" if name == "embedded" else name)


def synthetic_request(request, k: int):
    """``k`` concepts: the policy's own first, then synthetic ones built like them (4 templates, one neighbour)."""
    from safeguard.contracts import ConceptRequest, EraseRequest
    from safeguard.policy import DEFAULT_TEMPLATES

    concepts = list(request.concepts[:k])
    templates = DEFAULT_TEMPLATES["character"]
    for i in range(len(concepts), k):
        name, neighbour = f"figure number {i}", f"statue number {i}"
        concepts.append(ConceptRequest(name=name, category="character", forget_prompts=[t.format(name) for t in templates],
                                       retain_prompts=[t.format(neighbour) for t in templates[:2]]))
    return EraseRequest(concepts=concepts, keep_prompts=list(request.keep_prompts), seed=request.seed)


# --------------------------------------------------------------------------------------------- sections
def pure_against_floor(pipe, eraser_cls, request, params, restore, device) -> dict:
    """PURE's edit seconds against replaying its capture's denoiser calls through the bare denoiser."""
    import torch

    from safeguard.attention import denoiser_of

    denoiser = denoiser_of(pipe)
    calls = []

    def record(module, args, kwargs):
        clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else (  # noqa: E731
            {k: clone(x) for k, x in v.items()} if isinstance(v, dict) else v)
        calls.append(([clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()}))

    handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    _sync(device)
    started = time.perf_counter()
    try:
        result = eraser_cls().erase(pipe, request, params)
        _sync(device)
    finally:
        handle.remove()
    edit = time.perf_counter() - started
    restore()
    started = time.perf_counter()
    with torch.no_grad():
        for args, kwargs in calls:
            denoiser(*args, **kwargs)
    _sync(device)
    floor = time.perf_counter() - started
    first = lambda args, kwargs: next(v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor))  # noqa: E731
    batches = sorted({int(first(args, kwargs).shape[0]) for args, kwargs in calls})
    return {"edit_s": edit, "capture_s": result.stats.get("capture_seconds"), "solve_s": result.stats.get("solve_seconds"),
            "floor_s": floor, "calls": len(calls), "batches": batches, "ratio": edit / floor if floor else None}


def capture_memory(pipe, prompts, params, device) -> dict:
    import torch

    from safeguard.attention import capture_activations, size_options

    kwargs = dict(num_inference_steps=params.steps, guidance_scale=params.guidance_scale, output_type="latent",
                  **size_options(pipe, params.height, params.width))

    def plain():
        with torch.no_grad():
            return pipe(list(prompts), generator=[torch.Generator().manual_seed(0) for _ in prompts], **kwargs)

    def capture():
        return capture_activations(pipe, prompts, steps=params.steps, seeds=[0], guidance_scale=params.guidance_scale,
                                   height=params.height, width=params.width, batch_size=len(prompts))

    plain(), capture()  # warm-up: first-call allocations belong to neither
    plain_bytes, _ = peak_memory(plain, device)
    capture_bytes, _ = peak_memory(capture, device)
    model = in_use(device)  # the loaded model (and everything else the process holds)
    return {"model_mb": model / 2**20, "plain_mb": plain_bytes / 2**20, "capture_mb": capture_bytes / 2**20,
            "ratio": (model + capture_bytes) / (model + plain_bytes),
            "added_ratio": capture_bytes / plain_bytes if plain_bytes > 0 else None, "prompts": len(prompts)}


def probe_against_bare(pipe, prompts, images: int, settings, device) -> dict:
    import torch

    from safeguard.contracts import ProbeCase
    from safeguard.probing import render, size_kwargs

    seeds = [settings.seed + i for i in range(images)]
    cases = [ProbeCase(p, "x", ["x"], ["x"]) for p in prompts]
    jobs = [(p, s) for p in prompts for s in seeds]

    def bare():
        out = []
        for start in range(0, len(jobs), settings.batch_size):
            chunk = jobs[start:start + settings.batch_size]
            out += pipe(prompt=[p for p, _ in chunk], num_inference_steps=settings.steps,
                        guidance_scale=settings.guidance_scale, **size_kwargs(settings, pipe),
                        generator=[torch.Generator(device="cpu").manual_seed(s) for _, s in chunk]).images
        return out

    bare()  # warm-up
    timings = {"bare": [], "safeguard": []}
    for _ in range(2):  # interleaved, so a busy machine slows both alike
        for name, fn in (("bare", bare), ("safeguard", lambda: render(pipe, cases, seeds, settings))):
            _sync(device)
            started = time.perf_counter()
            fn()
            _sync(device)
            timings[name].append(time.perf_counter() - started)
    bare_s, ours_s = min(timings["bare"]), min(timings["safeguard"])
    return {"images": len(jobs), "bare_s": bare_s, "safeguard_s": ours_s,
            "ratio": bare_s / ours_s if ours_s else None}  # throughput ratio: ours / bare


def main() -> None:
    import torch

    from safeguard import runtime
    from safeguard.engine import make_plan
    from safeguard.plugins import get_erasers
    from safeguard.policy import load_policy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--policy", default="policies/demo.yaml")
    ap.add_argument("--size", type=int, default=None, help="capture and probe resolution in pixels (default: native)")
    ap.add_argument("--concepts", default="1,5,10,20,50,100")
    ap.add_argument("--probe-prompts", type=int, default=4)
    ap.add_argument("--probe-images", type=int, default=2)
    ap.add_argument("--probe-steps", type=int, default=None, help="default: the policy's probes.steps")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--skip", default="", help=f"comma-separated sections to skip: {', '.join(SECTIONS)}")
    args = ap.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime.configure(device=args.device, dtype=args.dtype, quiet=True)

    loaded = load_policy(args.policy)
    plan = make_plan(loaded)
    erasers = get_erasers()
    pure = erasers["pure"]
    params = pure.Params.model_validate({**(plan.params.model_dump() if plan.eraser_cls is pure else {}),
                                         **({"height": args.size, "width": args.size} if args.size else {})})
    settings = loaded.policy.probes.model_copy(update={k: v for k, v in (("height", args.size), ("width", args.size),
                                                                         ("steps", args.probe_steps)) if v})
    started = time.perf_counter()
    pipe = load_model(args.model)
    device = runtime.execution_device(pipe)
    from safeguard.attention import denoiser_of

    denoiser = denoiser_of(pipe)
    original = copy.deepcopy(denoiser.state_dict())
    restore = lambda: denoiser.load_state_dict(original)  # noqa: E731
    print(f"model {args.model} on {device} ({str(denoiser.dtype).removeprefix('torch.')}), loaded in "
          f"{time.perf_counter() - started:.1f}s; torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"PURE {params.model_dump(exclude_none=True)}; probes {settings.steps} steps at "
          f"{args.size or 'native'} px", flush=True)
    request = plan.request

    if "floor" not in skip:
        r = pure_against_floor(pipe, pure, request, params, restore, device)
        print(f"1. PURE edit {r['edit_s']:.1f}s (capture {r['capture_s']:.1f}s, solve {r['solve_s']:.1f}s) against its "
              f"floor {r['floor_s']:.1f}s ({r['calls']} bare denoiser calls, batches {r['batches']}): "
              f"{r['ratio']:.2f}x (target <= 1.25x)", flush=True)
    if "memory" not in skip:
        prompts = request.concepts[0].forget_prompts[: params.batch_size]
        r = capture_memory(pipe, prompts, params, device)
        added = f"{r['added_ratio']:.2f}x" if r["added_ratio"] is not None else "n/a"
        print(f"2. capture peak memory {r['model_mb'] + r['capture_mb']:.0f} MB (model {r['model_mb']:.0f} MB + "
              f"{r['capture_mb']:.1f} MB) against plain inference {r['model_mb'] + r['plain_mb']:.0f} MB (+ "
              f"{r['plain_mb']:.1f} MB), {r['prompts']} prompts, {params.steps} steps: {r['ratio']:.2f}x (target <= 1.1x); "
              f"above the model alone {added}", flush=True)
    if "probe" not in skip:
        prompts = [p for c in request.concepts for p in c.forget_prompts][: args.probe_prompts]
        r = probe_against_bare(pipe, prompts, args.probe_images, settings, device)
        print(f"3. probe generation {r['images']} images: safeguard {r['safeguard_s']:.1f}s, bare pipeline "
              f"{r['bare_s']:.1f}s: {r['ratio']:.2f}x the bare throughput (target >= 0.9x)", flush=True)
    if "uce" not in skip:
        restore()
        uce = erasers["uce"]
        _sync(device)
        started = time.perf_counter()
        uce().erase(pipe, request, uce.Params())
        _sync(device)
        print(f"4. UCE edit {time.perf_counter() - started:.2f}s ({len(request.concepts)} concepts)", flush=True)
    if "scaling" not in skip:
        counts = [int(k) for k in args.concepts.split(",") if k]
        seconds = []
        for k in counts:
            restore()
            _sync(device)
            started = time.perf_counter()
            pure().erase(pipe, synthetic_request(request, k), params)
            _sync(device)
            seconds.append(time.perf_counter() - started)
            print(f"5. {k:>4} concepts: PURE edit {seconds[-1]:.1f}s ({seconds[-1] / k:.2f}s per concept)", flush=True)
        if len(counts) >= 2:
            slope, intercept = statistics.linear_regression(counts, seconds)
            worst = max(abs(s - (intercept + slope * k)) / s for k, s in zip(counts, seconds))
            print(f"   line: {intercept:.1f}s + {slope:.2f}s per concept; the farthest point is {worst:.0%} off it; "
                  f"{counts[-1]} concepts took {seconds[-1] / 60:.1f} min (target on the embedded model: 100 in < 5 min)")
    restore()


if __name__ == "__main__":
    main()
