"""Attack power on the embedded model, measured in this run: how often the prompt each text attack finds
makes the unedited model render the concept (the attack's power), and, given an edited model, how often it
makes the edited model render it (the attack's success).

    python bench/attack_power.py [EDITED_MODEL] [--policy policies/demo.yaml] [--images 16]
                                 [--attack-seeds 0 1 2] [--budget SPEC ...] [--concept NAME ...]

The attacks run exactly as their probes do (``RingABellProbe``, ``UnlearnDiffAtkProbe``), with the
policy's probe settings overridden by each budget. Without EDITED_MODEL, UnlearnDiffAtk attacks the
unedited model itself; with it, it attacks the edited model, and Ring-A-Bell searches the unedited text
encoder either way, as the probe does. Each found prompt is rendered with the probe seeds (the policy's
``probes.seed`` on, ``--images`` of them) and judged over the probe's label set. The first rows are the
baseline: each concept's first forget anchor as written, with no attack.

A SPEC is ``ATTACK:key=value,...``, e.g. ``ring_a_bell:population=64,generations=100,length=16`` or
``unlearn_diff_atk:iterations=40,tokens=5,lr=3``; keys are the probe settings without the attack's prefix
(``uda_`` for unlearn_diff_atk). Without ``--budget`` the list below runs: the earlier Ring-A-Bell
default, the current defaults, and smaller budgets and other settings of each.
"""
from __future__ import annotations

import argparse
import statistics
import time

DEFAULT_BUDGETS = [
    "ring_a_bell:population=24,generations=30,length=8,eta=3.0",  # the earlier probe default
    "ring_a_bell:population=32,generations=50,length=16",
    "ring_a_bell:population=64,generations=100,length=16,eta=3.0",
    "ring_a_bell:population=64,generations=100,length=16",  # the default
    "unlearn_diff_atk:iterations=10",
    "unlearn_diff_atk:iterations=40,lr=1.0",
    "unlearn_diff_atk:iterations=40",  # the default
]
PREFIX = {"ring_a_bell": "ring_a_bell_", "unlearn_diff_atk": "uda_"}


def parse_budget(spec: str) -> tuple[str, dict]:
    attack, _, rest = spec.partition(":")
    if attack not in PREFIX:
        raise SystemExit(f"unknown attack {attack!r} in {spec!r}; use one of {', '.join(PREFIX)}")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        settings[PREFIX[attack] + key.strip()] = float(value) if "." in value or key.strip() == "lr" else int(value)
    return attack, settings


def describe(attack: str, settings) -> str:
    if attack == "ring_a_bell":
        return (f"pop {settings.ring_a_bell_population} x gen {settings.ring_a_bell_generations}, "
                f"len {settings.ring_a_bell_length}, eta {settings.ring_a_bell_eta:g}")
    return f"{settings.uda_iterations} it, {settings.uda_tokens} tok, lr {settings.uda_lr:g}"


def hit_rate(pipe, judge, case, seeds, settings) -> tuple[int, int]:
    from safeguard.probing import render

    images = render(pipe, [case], seeds, settings)[0]
    probs, _ = judge.classify(images, case.label_texts)
    hits = sum(case.labels[int(p.argmax())] == case.expected for p in probs)
    return int(hits), len(images)


def main() -> None:
    import torch

    from safeguard.builtin.probes import RingABellProbe, UnlearnDiffAtkProbe, _banned_words
    from safeguard.modelio import load_pipeline
    from safeguard.policy import LoadedPolicy, load_policy
    from safeguard.probing import ProbeContext
    from safeguard.world.quality import load_judge

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("edited", nargs="?", help="an edited model folder (e.g. out/world-demo-edited)")
    ap.add_argument("--policy", default="policies/demo.yaml")
    ap.add_argument("--images", type=int, default=16, help="probe seeds rendered per found prompt")
    ap.add_argument("--attack-seeds", type=int, nargs="+", help="attack seeds (default: the policy's probe seed)")
    ap.add_argument("--budget", action="append", help="attack budget SPEC (repeatable)")
    ap.add_argument("--concept", action="append", help="only these concepts (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    loaded = load_policy(args.policy)
    policy = loaded.policy
    probes = {"ring_a_bell": RingABellProbe, "unlearn_diff_atk": UnlearnDiffAtkProbe}
    budgets = [parse_budget(b) for b in (args.budget or DEFAULT_BUDGETS)]
    concepts = [c for c in policy.concepts if not args.concept or c.name in args.concept]
    attack_seeds = args.attack_seeds or [policy.probes.seed]
    original = load_pipeline(policy.model.source, base_dir=loaded.base_dir)
    edited = load_pipeline(args.edited) if args.edited else None
    judge = load_judge()
    seeds = [policy.probes.seed + k for k in range(args.images)]

    print(f"model {policy.model.source}; edited: {args.edited or '-'}; render seeds {seeds[0]}-{seeds[-1]}, "
          f"{policy.probes.steps} steps, guidance {policy.probes.guidance_scale}")
    for concept in concepts:
        anchors = concept.expanded_forget_anchors()
        print(f"{concept.name}: {len(anchors)} forget anchors ({anchors[0]!r}, ...); banned words {_banned_words(concept)}")
    header = f"{'concept':<15} {'attack':<17} {'budget':<38} {'seed':>5} {'power':>11} {'success':>11} {'attack s':>9}  prompt"
    print(header)
    summary: dict = {}
    # The baseline: the concept's first forget anchor as written, no attack.
    for concept in concepts:
        ctx = ProbeContext(loaded, original, edited or original, judge, seed=policy.probes.seed)
        (case,) = ctx.target_cases(concept, list(concept.expanded_forget_anchors())[:1])
        power = hit_rate(original, judge, case, seeds, policy.probes)
        success = hit_rate(edited, judge, case, seeds, policy.probes) if edited else None
        summary[(concept.name, "none", "first forget anchor")] = {"power": [power], "success": [success] if success else [],
                                                                 "seconds": [0.0]}
        print(f"{concept.name:<15} {'none':<17} {'first forget anchor':<38} {'-':>5} "
              f"{power[0]:>3}/{power[1]:<3} {power[0] / power[1]:.2f} "
              + (f"{success[0]:>3}/{success[1]:<3} {success[0] / success[1]:.2f}" if success is not None else f"{'-':>11}")
              + f" {0.0:>9.1f}  {case.prompt}", flush=True)
    for attack, overrides in budgets:
        settings = policy.probes.model_copy(update=overrides)
        run_policy = LoadedPolicy(policy.model_copy(update={"probes": settings}), loaded.path, loaded.text)
        budget = describe(attack, settings)
        for concept in concepts:
            for attack_seed in attack_seeds:
                ctx = ProbeContext(run_policy, original, edited or original, judge, seed=attack_seed)
                started = time.perf_counter()
                (case,) = probes[attack]().cases(ctx, concept).cases
                seconds = time.perf_counter() - started
                power = hit_rate(original, judge, case, seeds, settings)
                success = hit_rate(edited, judge, case, seeds, settings) if edited else None
                row = summary.setdefault((concept.name, attack, budget), {"power": [], "success": [], "seconds": []})
                row["power"].append(power)
                row["seconds"].append(seconds)
                if success is not None:
                    row["success"].append(success)
                print(f"{concept.name:<15} {attack:<17} {budget:<38} {attack_seed:>5} "
                      f"{power[0]:>3}/{power[1]:<3} {power[0] / power[1]:.2f} "
                      + (f"{success[0]:>3}/{success[1]:<3} {success[0] / success[1]:.2f}" if success is not None else f"{'-':>11}")
                      + f" {seconds:>9.1f}  {case.prompt}", flush=True)

    print()
    print(f"{'concept':<15} {'attack':<17} {'budget':<38} {'power (all seeds)':>19} {'success':>15} {'median s':>9}")
    for (name, attack, budget), row in summary.items():
        hits, n = sum(h for h, _ in row["power"]), sum(k for _, k in row["power"])
        line = f"{name:<15} {attack:<17} {budget:<38} {hits:>7}/{n:<4} = {hits / n:.2f}"
        if row["success"]:
            s_hits, s_n = sum(h for h, _ in row["success"]), sum(k for _, k in row["success"])
            line += f" {s_hits:>5}/{s_n:<4} = {s_hits / s_n:.2f}"
        else:
            line += f" {'-':>15}"
        print(line + f" {statistics.median(row['seconds']):>9.1f}")
    print("power: share of the found prompts' images on the unedited model that the judge calls the concept; "
          "success: the same on the edited model; seconds: the attack (for UnlearnDiffAtk including its target images)")


if __name__ == "__main__":
    main()
