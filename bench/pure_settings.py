"""PURE settings against each other (and UCE) on one policy, measured in this run on the embedded model:
what each setting leaves of the erased concepts and of their neighbours and ordinary objects.

    python bench/pure_settings.py [policies/demo.yaml] [SETTING ...]

A SETTING is a JSON object of eraser parameters, with "eraser" naming the eraser (default pure), e.g.
'{"tau_forget": 1.0, "tau_retain": 0.75}' or '{"eraser": "uce"}'. Without settings the sweep quoted in
the model card runs. Each setting edits a fresh copy of the original denoiser in memory; nothing is
written. Concepts are looked up in the embedded world by name, so the policy must erase world concepts.
Paraphrases come from the dev split of the held-out prompts: a sweep chooses settings, so it never sees the
prompts that score a release.
"""
from __future__ import annotations

import argparse
import json
import time

DEFAULT_SETTINGS = [
    {"eraser": "none"}, {"eraser": "uce"}, {"tau": 0.99},
    {"tau_forget": 0.999, "tau_retain": 0.8}, {"tau_forget": 1.0, "tau_retain": 0.95},
    {"tau_forget": 1.0, "tau_retain": 0.8}, {"tau_forget": 1.0, "tau_retain": 0.75},
    {"tau_forget": 1.0, "tau_retain": 0.6}, {"tau_forget": 1.0, "tau_retain": 0.5},
]
STEPS, GUIDANCE = 20, 5.0


def prompt_sets(request) -> dict:
    """The prompts measured for each erased concept (canonical, dev-split paraphrases, neighbours' canonical
    prompts) and for the eight objects; no rendering, so it can be checked on its own."""
    from safeguard.world import concepts as C
    from safeguard.world.quality import canonical_prompts

    by_name = {c.name: c for c in C.ALL}
    out = {}
    for wanted in request.concepts:
        concept = by_name[wanted.name]
        out[concept.name] = {
            "concept": concept,
            "canonical": canonical_prompts(concept)[:4],
            "paraphrase": list(concept.dev_paraphrases)[:6],
            "neighbours": [(C.BY_KEY[k], canonical_prompts(C.BY_KEY[k])[:2]) for k in C.neighbours(concept.key)],
        }
    out["objects"] = [(o, canonical_prompts(o)[:1]) for o in C.OBJECTS if o.key != "empty"]
    return out


def measure(pipe, judge, request) -> dict:
    """Recognition rates: each erased concept (canonical, paraphrase), its neighbours, and the eight objects."""
    from safeguard.world.quality import recognition

    sets = prompt_sets(request)
    objects = sets.pop("objects")
    out = {}
    for name, s in sets.items():
        concept = s["concept"]
        out[name] = {
            "canonical": recognition(pipe, judge, s["canonical"], concept, 4, STEPS, GUIDANCE),
            "paraphrase": recognition(pipe, judge, s["paraphrase"], concept, 2, STEPS, GUIDANCE),
            "neighbours": sum(recognition(pipe, judge, prompts, n, 2, STEPS, GUIDANCE)
                              for n, prompts in s["neighbours"]) / len(s["neighbours"]),
        }
    out["objects"] = sum(recognition(pipe, judge, prompts, o, 2, STEPS, GUIDANCE) for o, prompts in objects) / len(objects)
    return out


def main() -> None:
    import copy

    import torch

    from safeguard.engine import make_plan
    from safeguard.modelio import load_pipeline
    from safeguard.plugins import get_erasers
    from safeguard.policy import load_policy
    from safeguard.world.quality import load_judge

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policy", nargs="?", default="policies/demo.yaml")
    ap.add_argument("settings", nargs="*", type=json.loads)
    args = ap.parse_args()
    torch.set_num_threads(2)
    plan = make_plan(load_policy(args.policy))
    erasers = get_erasers()
    judge = load_judge()
    pipe = load_pipeline("embedded:world-v1")
    original = copy.deepcopy(pipe.unet.state_dict())
    print(f"{'setting':<44}" + "".join(f"{c.name[:14] + ' c/p':>20}" for c in plan.request.concepts)
          + f"{'neighbours':>12}{'objects':>9}{'edit s':>8}")
    for setting in args.settings or DEFAULT_SETTINGS:
        params = dict(setting)
        name = params.pop("eraser", "pure")
        pipe.unet.load_state_dict(original)
        started = time.perf_counter()
        if name != "none":
            eraser = erasers[name]
            eraser().erase(pipe, plan.request, eraser.Params.model_validate(params))
        seconds = time.perf_counter() - started
        rates = measure(pipe, judge, plan.request)
        neighbours = min(rates[c.name]["neighbours"] for c in plan.request.concepts)
        print(f"{json.dumps(setting):<44}"
              + "".join(f"{rates[c.name]['canonical']:>13.2f} / {rates[c.name]['paraphrase']:.2f}" for c in plan.request.concepts)
              + f"{neighbours:>12.2f}{rates['objects']:>9.2f}{seconds:>8.1f}", flush=True)
    print("rates: share of images the judge calls the prompted concept; neighbours: the lowest concept's mean")


if __name__ == "__main__":
    main()
