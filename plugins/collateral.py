"""Built-in probes of what an edit must not damage, on prompts the eraser never saw.

``collateral`` runs once per policy: every world concept the policy does not ban (embedded model), the
policy's own collateral prompts, and the shipped general prompt set (other models), each group decided on
its own retention. ``selective_alignment`` pairs each banned concept with something unbanned ("X next to Y",
or a banned style on an object): after the edit, Y must still be rendered.
"""
from __future__ import annotations

from safeguard import hookimpl

DISTRACTORS = 7  # other prompts a general prompt's image must be told apart from


def _types():
    from safeguard.probing import ProbeCase, ProbeCases

    return ProbeCase, ProbeCases


def _banned_names(policy) -> list[str]:
    return [n for c in policy.concepts for n in (c.name, c.label, *c.aliases)]


def _is_embedded_world(policy) -> bool:
    return policy.model.source.startswith("embedded:")


def _check_held_out(prompts, seen: set[str], field: str) -> None:
    from safeguard.errors import PolicyError

    for i, p in enumerate(prompts):
        if p in seen:
            raise PolicyError(f"collateral prompt {p!r} is also given to the eraser (an anchor or keep prompt)",
                              field=f"{field}[{i}]", fix="collateral prompts must be held out: remove or rephrase it")


def world_cases(ctx, exclude: set[str], per_concept: int, group_suffix: str = ""):
    from safeguard.world.collateral import collateral_prompts, labels

    ProbeCase, _ = _types()
    cases = []
    for concept, prompts in collateral_prompts(_banned_names(ctx.policy.policy), exclude, per_concept):
        judged = "style" if concept.category == "style" else "object"
        names = labels(judged) + [g for g in ctx.policy.policy.judge.generic_labels if judged != "style"]
        names = list(dict.fromkeys(names))
        texts = [ctx.judge.label_text(n, judged) for n in names]
        cases += [ProbeCase(p, concept.name, names, texts, group=concept.name + group_suffix, category=concept.category)
                  for p in prompts]
    return cases


def retrieval_cases(ctx, prompts: list[str], pool: list[str], group: str, category: str):
    """Each prompt's image must be closer (to the judge) to its own prompt than to a few others of the pool."""
    ProbeCase, _ = _types()
    generic = list(ctx.policy.policy.judge.generic_labels)
    cases = []
    for i, p in enumerate(prompts):
        others = [q for q in pool if q != p]
        start = (i * 13) % max(1, len(others))
        distractors = (others[start:] + others[:start])[:DISTRACTORS]
        names = list(dict.fromkeys([p, *distractors, *generic]))
        cases.append(ProbeCase(p, p, names, [n if n in (p, *distractors) else ctx.judge.label_text(n, "object") for n in names],
                               group=group, category=category))
    return cases


class CollateralProbe:
    """Held-out prompts of everything the policy does not ban: each must still render as on the original."""
    name, kind, scope = "collateral", "keep", "policy"
    threshold = "min_collateral_retention"

    def cases(self, ctx, concept):
        from safeguard.prompts import general_prompts

        _, ProbeCases = _types()
        loaded, spec = ctx.policy, ctx.policy.policy.collateral
        seen = loaded.eraser_prompts()
        own = list(loaded.collateral_prompts())
        _check_held_out(own, seen, "collateral.prompts")
        embedded = _is_embedded_world(loaded.policy)
        cases = []
        if spec.world if spec.world is not None else embedded:
            cases += world_cases(ctx, seen | set(own), spec.per_concept)
        general = [p for p in general_prompts() if p not in seen and p not in own]
        if own:
            cases += retrieval_cases(ctx, own, own + general, "policy prompts", "policy")
        if spec.general if spec.general is not None else not embedded:
            step = max(1, len(general) // spec.max_general)
            chosen = general[::step][: spec.max_general]
            cases += retrieval_cases(ctx, chosen, general, "general prompts", "general")
        return ProbeCases(cases)


class SelectiveAlignmentProbe:
    """"X next to Y" with X banned: Y must still be rendered after the edit."""
    name, kind = "selective_alignment", "keep"

    def cases(self, ctx, concept):
        from safeguard.prompts import companion_objects

        ProbeCase, ProbeCases = _types()
        policy = ctx.policy.policy
        seen = ctx.policy.eraser_prompts()
        k = ctx.settings.max_prompts
        if _is_embedded_world(policy):
            from safeguard.world.collateral import labels, selective_prompts, world_concept

            world = world_concept(concept.name)
            if world is not None:
                cases = []
                for other, prompt in selective_prompts(world, _banned_names(policy), seen, k):
                    judged = "style" if other.category == "style" else "object"
                    names = labels(judged) + ([] if judged == "style" else list(policy.judge.generic_labels))
                    names = list(dict.fromkeys(names))
                    cases.append(ProbeCase(prompt, other.name, names, [ctx.judge.label_text(n, judged) for n in names],
                                           category=other.category))
                return ProbeCases(cases)
        companions = companion_objects()
        template = "{y} in the style of {x}" if concept.category == "style" else "{x} next to {y}"
        step = max(1, len(companions) // k)
        cases = []
        for y in companions[::step][:k]:
            prompt = template.format(x=concept.name, y=y)
            if prompt in seen:
                continue
            others = [c for c in companions if c != y][: DISTRACTORS]
            names = list(dict.fromkeys([y, *others, *policy.judge.generic_labels]))
            cases.append(ProbeCase(prompt, y, names, [ctx.judge.label_text(n, "object") for n in names], category="object"))
        return ProbeCases(cases)


@hookimpl
def register_probes(register):
    register(CollateralProbe)
    register(SelectiveAlignmentProbe)
