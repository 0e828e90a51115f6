"""Built-in leakage probes: the concept's own prompts, paraphrases, replayed prompt lists, four live
attacks against the edited model, and the neighbours and keep prompts that must survive.

Attack probes say so (``attack = True``) and name what the attacker needs (``threat_model``): "text" when
what they find is a prompt anyone could type, "weights" when it is an embedding only someone with the
model's weights can feed in."""
from __future__ import annotations


from safeguard import hookimpl


def _context_types():
    from safeguard.probing import ProbeCase, ProbeCases

    return ProbeCase, ProbeCases


class CanonicalProbe:
    """The concept's forget anchors: the prompts an eraser was told about."""
    name, kind = "canonical", "target"

    def cases(self, ctx, concept):
        _, ProbeCases = _context_types()
        return ProbeCases(ctx.target_cases(concept, list(concept.expanded_forget_anchors())))


class ParaphraseProbe:
    """Held-out prompts that evoke the concept without its canonical phrasing."""
    name, kind = "paraphrase", "target"

    def cases(self, ctx, concept):
        _, ProbeCases = _context_types()
        return ProbeCases(ctx.target_cases(concept, list(ctx.policy.paraphrases(concept))))


class ReplayProbe:
    """Fixed prompt lists (TXT/CSV), e.g. published attack sets; prompts naming no concept apply to all."""
    name, kind = "replay", "target"

    def cases(self, ctx, concept):
        from safeguard.policy import read_prompt_file

        _, ProbeCases = _context_types()
        prompts = []
        for i, f in enumerate(ctx.settings.replay_files):
            field = f"probes.replay_files[{i}]"
            prompts += read_prompt_file(ctx.policy.resolve(f, field), field)
        return ProbeCases(ctx.target_cases(concept, prompts))


class NeighboursProbe:
    """Concepts of the same category that the policy keeps: they must still render after the edit."""
    name, kind = "neighbours", "keep"

    def cases(self, ctx, concept):
        ProbeCase, ProbeCases = _context_types()
        labels, texts = ctx.concept_labels(concept)
        per = max(1, ctx.settings.max_prompts // max(1, len(concept.neighbours)))
        cases = [ProbeCase(p, n, labels, texts) for n in concept.neighbours for p in concept.neighbour_prompts(n)[:per]]
        return ProbeCases(cases)


class KeepProbe:
    """The policy's general keep prompts: the edited image should show what the original showed."""
    name, kind = "keep", "keep"

    def cases(self, ctx, concept):
        ProbeCase, ProbeCases = _context_types()
        keep = list(ctx.policy.policy.keep)[: ctx.settings.max_prompts]
        generic = list(ctx.policy.policy.judge.generic_labels)
        labels = keep + [g for g in generic if g not in keep]
        texts = keep + [ctx.judge.label_text(g, "object") for g in generic if g not in keep]
        return ProbeCases([ProbeCase(p, p, labels, texts) for p in keep])


_FUNCTION_WORDS = frozenset({"the", "and", "for", "with", "from", "into", "over", "under", "les", "der", "die", "das"})


def _banned_words(concept) -> list[str]:
    """Words (3+ letters) no attack token may contain: the concept's name and aliases, so the attack never
    simply asks for it, and the names of the neighbours the policy keeps. A prompt that names a kept
    neighbour draws that neighbour, on the original model too; without them Ring-A-Bell's Pikachu search
    drifted to "mickey" and "luigi" in some seeds and lost its power there."""
    names = (concept.name, *concept.aliases, *concept.neighbours)
    # Any token containing a banned word is dropped, so function words ("Sonic the Hedgehog") would take
    # out every token that contains them.
    return sorted({w.lower() for n in names for w in n.split() if len(w) > 2 and w.lower() not in _FUNCTION_WORDS})


def _neutral_pairs(concept) -> tuple[list[str], list[str]]:
    """Each forget anchor that names the concept, paired with the same prompt with the name replaced."""
    import re

    names = sorted((concept.name, *concept.aliases), key=len, reverse=True)  # "blood splatter" before "blood"
    pattern = re.compile("|".join(re.escape(n) for n in names), re.IGNORECASE)
    pairs = [(a, pattern.sub("something", a)) for a in concept.expanded_forget_anchors() if pattern.search(a)]
    if not pairs:
        return list(concept.expanded_forget_anchors())[:1], ["a picture"]
    return [a for a, _ in pairs], [n for _, n in pairs]


def _original_latents(ctx, prompts, seed_offset: int):
    """The original model's latents for ``prompts``, one seed each from ``seed_offset`` on (kept disjoint
    from the probe seeds, so the attack never sees the images it is judged on), at the probe resolution."""
    import torch

    from safeguard.probing import size_kwargs

    out = []
    for k, prompt in enumerate(prompts):
        result = ctx.original(prompt=prompt, num_inference_steps=ctx.settings.steps, guidance_scale=ctx.settings.guidance_scale,
                              generator=torch.Generator().manual_seed(seed_offset + k), output_type="latent",
                              **size_kwargs(ctx.settings, ctx.original))
        out.append(result.images)
    return torch.cat(out)


def _detached(tensor):
    return None if tensor is None else tensor.detach()


class RingABellProbe:
    """Text-encoder-only discrete prompt search towards the concept direction (Ring-A-Bell style)."""
    name, kind = "ring_a_bell", "target"
    attack, threat_model = True, "text"  # the attacker only writes prompts

    def cases(self, ctx, concept):
        from .attacks import prompt_token_room, ring_a_bell

        ProbeCase, ProbeCases = _context_types()
        s = ctx.settings
        concept_prompts, neutral = _neutral_pairs(concept)
        banned = _banned_words(concept)
        length = min(s.ring_a_bell_length, prompt_token_room(ctx.original))
        # Only the text encoder is searched, so the original's is used: the prompt must evoke the concept
        # on the unedited model for the probe to say anything about the edited one.
        result = ring_a_bell(ctx.original, concept_prompts, neutral, budget=s.ring_a_bell_generations, seed=ctx.seed,
                             length=length, population=s.ring_a_bell_population, eta=s.ring_a_bell_eta,
                             banned_words=banned)
        labels, texts = ctx.concept_labels(concept)
        attack = {"budget": result.budget, "steps_used": result.steps_used, "seed": result.seed, "prompt": result.prompt,
                  "score": result.score, "seconds": result.seconds, "banned_words": banned,
                  "population": s.ring_a_bell_population, "generations": s.ring_a_bell_generations, "length": length,
                  "eta": s.ring_a_bell_eta, "evaluations": s.ring_a_bell_population * (s.ring_a_bell_generations + 1),
                  "prompts_encoded": result.details["prompts_encoded"],
                  "concept_prompt_cosine": result.details["concept_prompt_cosine"]}
        return ProbeCases([ProbeCase(result.prompt, concept.label, labels, texts)], attack=attack,
                          images_per_prompt=s.attack_images)


class UnlearnDiffAtkProbe:
    """UnlearnDiffAtk: a few discrete prefix tokens before the concept's prompt, searched with the edited
    denoiser's own loss toward the original model's images of the concept; the result is a plain prompt."""
    name, kind = "unlearn_diff_atk", "target"
    attack, threat_model = True, "text"  # white-box search, but what it yields is a prompt anyone can type

    def cases(self, ctx, concept):
        from .attacks import unlearn_diff_attack

        ProbeCase, ProbeCases = _context_types()
        s = ctx.settings
        anchors = list(concept.expanded_forget_anchors())[:4]
        latents = _original_latents(ctx, anchors, 20_000)
        banned = _banned_words(concept)
        result = unlearn_diff_attack(ctx.edited, latents, anchors[0], n_tokens=s.uda_tokens, budget=s.uda_iterations,
                                     lr=s.uda_lr, seed=ctx.seed, banned_words=banned)
        labels, texts = ctx.concept_labels(concept)
        d = result.details
        attack = {"budget": result.budget, "steps_used": result.steps_used, "seed": result.seed, "prompt": result.prompt,
                  "score": result.score, "seconds": result.seconds, "banned_words": banned,
                  "iterations": s.uda_iterations, "tokens": s.uda_tokens, "lr": s.uda_lr, "init_prompt": anchors[0],
                  "target_latents": len(anchors), "prefix": d["prefix"], "loss_before": d["loss_before"],
                  "loss_after": d["loss_after"], "candidates_evaluated": d["candidates_evaluated"]}
        return ProbeCases([ProbeCase(result.prompt, concept.label, labels, texts)], attack=attack,
                          images_per_prompt=s.attack_images)


class SoftPromptProbe:
    """White-box concept inversion: optimise a few context tokens with the edited denoiser's own loss so
    that it reproduces the original model's images of the concept (CCE style)."""
    name, kind = "soft_prompt", "target"
    attack, threat_model = True, "weights"  # it writes context vectors no prompt spells

    def cases(self, ctx, concept):
        from .attacks import soft_prompt_attack

        ProbeCase, ProbeCases = _context_types()
        anchors = list(concept.expanded_forget_anchors())[:4]
        latents = _original_latents(ctx, anchors, 10_000)
        result = soft_prompt_attack(ctx.edited, latents, init_prompt=anchors[0], budget=ctx.settings.attack_budget,
                                    seed=ctx.seed)
        labels, texts = ctx.concept_labels(concept)
        desc = f"<soft prompt: {anchors[0]!r} with 4 optimised tokens>"
        attack = {"budget": result.budget, "steps_used": result.steps_used, "seed": result.seed, "prompt": None,
                  "embedding_tokens": 4, "init_prompt": anchors[0], "score": result.score, "seconds": result.seconds}
        return ProbeCases([ProbeCase(desc, concept.label, labels, texts, prompt_embeds=result.prompt_embeds.detach(),
                                     pooled_prompt_embeds=_detached(result.pooled_prompt_embeds))],
                          attack=attack, images_per_prompt=ctx.settings.attack_images)


class RECEProbe:
    """RECE's closed-form recovery embedding: the context that makes the edited K/V reproduce the
    original K/V of the concept prompt (linear algebra only)."""
    name, kind = "rece", "target"
    attack, threat_model = True, "weights"  # needs both models' weights and writes a raw context

    def cases(self, ctx, concept):
        from .attacks import rece_embedding

        ProbeCase, ProbeCases = _context_types()
        labels, texts = ctx.concept_labels(concept)
        prompts = list(concept.expanded_forget_anchors())[:2]
        cases, scores = [], []
        for prompt in prompts:
            result = rece_embedding(ctx.original, ctx.edited, prompt)
            scores.append(result.score)
            cases.append(ProbeCase(f"<RECE recovery of {prompt!r}>", concept.label, labels, texts,
                                   prompt_embeds=result.prompt_embeds.detach(),
                                   pooled_prompt_embeds=_detached(result.pooled_prompt_embeds)))
        attack = {"budget": 1, "steps_used": 1, "seed": None, "prompt": None, "embedding_tokens": int(cases[0].prompt_embeds.shape[1]),
                  "score": sum(scores) / len(scores), "note": "score = relative K/V residual after recovery (0 = fully recovered)"}
        return ProbeCases(cases, attack=attack, images_per_prompt=max(1, ctx.settings.attack_images // len(cases)))


BUILTIN_PROBES = (CanonicalProbe, ParaphraseProbe, ReplayProbe, NeighboursProbe, KeepProbe, RingABellProbe,
                  UnlearnDiffAtkProbe, SoftPromptProbe, RECEProbe)


@hookimpl
def register_probes(register):
    for probe in BUILTIN_PROBES:
        register(probe)
