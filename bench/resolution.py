"""Capture and probe resolution on the embedded model, measured in this run: what a lower (or higher) capture
resolution costs and changes.

    python bench/resolution.py [policies/demo.yaml] [--sizes 16,32,64] [--images 2] [--steps 10]

For every size S (pixels, square; the embedded model's native size is 32):

- capture: PURE with the policy's parameters and ``height = width = S`` edits a fresh copy of the original
  denoiser; printed are the capture's seconds, its pipeline calls and the seconds per call;
- erasure: recognition of every erased concept's canonical prompts on that edited model, rendered at the
  native size (only the capture resolution differs between rows), against the unedited model;
- probe resolution: recognition of the same prompts on the unedited model rendered at S, i.e. whether a probe
  at S can still see the concept at all (a probe whose original recognition collapses is uninformative).

Recognition is the share of images the embedded judge calls the prompted concept. Nothing is written.
"""
from __future__ import annotations

import argparse
import time


def recognition_at(pipe, judge, prompts, concept, *, images: int, steps: int, guidance: float, size: int | None) -> float:
    """Share of ``images`` seeds of every prompt the judge calls ``concept``, rendered at ``size`` px (None: native)."""
    import torch

    from safeguard.world.quality import style_labels, subject_labels

    names, texts = style_labels(judge) if concept.category == "style" else subject_labels(judge)
    target = names.index(concept.name)
    size_kwargs = {"height": size, "width": size} if size else {}
    hits = n = 0
    for prompt in prompts:
        out = pipe(prompt=[prompt] * images, num_inference_steps=steps, guidance_scale=guidance, **size_kwargs,
                   generator=[torch.Generator().manual_seed(1000 + k) for k in range(images)]).images
        probs, _ = judge.classify(out, texts)
        hits += int((probs.argmax(1) == target).sum())
        n += images
    return hits / n


def main() -> None:
    import copy

    import torch

    from safeguard.engine import make_plan
    from safeguard.modelio import load_pipeline
    from safeguard.policy import load_policy
    from safeguard.world import concepts as C
    from safeguard.world.quality import canonical_prompts, load_judge

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policy", nargs="?", default="policies/demo.yaml")
    ap.add_argument("--sizes", default="16,32,64", help="comma-separated square sizes in pixels (multiples of 8)")
    ap.add_argument("--images", type=int, default=2, help="seeds per prompt for recognition")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps for recognition renders")
    ap.add_argument("--prompts", type=int, default=2, help="canonical prompts per concept")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(2)

    loaded = load_policy(args.policy)
    plan = make_plan(loaded)
    if plan.eraser_cls.name != "pure":
        raise SystemExit(f"{args.policy}: this benchmark measures PURE's capture; the policy uses {plan.eraser_cls.name}")
    by_name = {c.name: c for c in C.ALL}
    concepts = [by_name[c.name] for c in plan.request.concepts]
    prompts = {c.name: canonical_prompts(c)[: args.prompts] for c in concepts}
    judge = load_judge()
    pipe = load_pipeline("embedded:world-v1")
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    original = copy.deepcopy(pipe.unet.state_dict())
    guidance = loaded.policy.probes.guidance_scale
    recognise = lambda c, size: recognition_at(pipe, judge, prompts[c.name], c, images=args.images,  # noqa: E731
                                              steps=args.steps, guidance=guidance, size=size)

    baseline = {c.name: recognise(c, None) for c in concepts}
    print(f"embedded model, native size {native} px; recognition of canonical prompts ({args.prompts} prompts x "
          f"{args.images} seeds, {args.steps} steps); unedited at native size: "
          + ", ".join(f"{k} {v:.2f}" for k, v in baseline.items()))
    print(f"{'size':>6}{'capture s':>11}{'calls':>7}{'s/call':>8}{'vs native':>11}  "
          + "".join(f"{c.name[:16] + ' edited/orig@S':>32}" for c in concepts))
    per_call_native = None
    for size in sorted(sizes, key=lambda s: s != native):  # the native size first: the others are compared to it
        pipe.unet.load_state_dict(original)
        params = plan.params.model_copy(update={"height": size, "width": size})
        started = time.perf_counter()
        result = plan.eraser_cls().erase(pipe, plan.request, params)
        capture = result.stats.get("capture_seconds", time.perf_counter() - started)
        calls = sum(-(-n // params.batch_size) for n in (result.stats["forget_prompts"], result.stats["retain_prompts"]) if n) \
            * params.seeds
        per_call = capture / max(calls, 1)
        if size == native:
            per_call_native = per_call
        edited = {c.name: recognise(c, None) for c in concepts}
        pipe.unet.load_state_dict(original)
        at_size = {c.name: recognise(c, size) for c in concepts}
        ratio = f"{per_call / per_call_native:.2f}x" if per_call_native else "n/a"
        print(f"{size:>6}{capture:>11.1f}{calls:>7}{per_call:>8.2f}{ratio:>11}  "
              + "".join(f"{edited[c.name]:>25.2f} / {at_size[c.name]:.2f}" for c in concepts), flush=True)
    print("edited: recognition at the native size after PURE captured at S; orig@S: the unedited model rendered at S")


if __name__ == "__main__":
    main()
