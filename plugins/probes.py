"""Built-in leakage probes: the concept's own prompts, paraphrases, replayed prompt lists, three live
attacks against the edited model, and the neighbours and keep prompts that must survive."""
from __future__ import annotations

from pathlib import Path

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


class RingABellProbe:
    """Text-encoder-only discrete prompt search towards the concept direction (Ring-A-Bell style)."""
    name, kind = "ring_a_bell", "target"

    def cases(self, ctx, concept):
        from safeguard.attacks import ring_a_bell

        ProbeCase, ProbeCases = _context_types()
        anchors = list(concept.expanded_forget_anchors())
        neutral = [a.replace(n, "something") for a in anchors for n in (concept.name, *concept.aliases) if n in a] or ["a picture"]
        banned = sorted({w.lower() for n in (concept.name, *concept.aliases) for w in n.split() if len(w) > 2})
        result = ring_a_bell(ctx.edited, anchors, neutral[: len(anchors)], budget=ctx.settings.attack_budget,
                             seed=ctx.seed, banned_words=banned)
        labels, texts = ctx.concept_labels(concept)
        attack = {"budget": result.budget, "steps_used": result.steps_used, "seed": result.seed, "prompt": result.prompt,
                  "score": result.score, "seconds": result.seconds, "banned_words": banned}
        return ProbeCases([ProbeCase(result.prompt, concept.label, labels, texts)], attack=attack,
                          images_per_prompt=ctx.settings.attack_images)


class SoftPromptProbe:
    """White-box concept inversion: optimise a few context tokens with the edited denoiser's own loss so
    that it reproduces the original model's images of the concept (UnlearnDiffAtk / CCE style)."""
    name, kind = "soft_prompt", "target"

    def cases(self, ctx, concept):
        import torch

        from safeguard.attacks import soft_prompt_attack

        ProbeCase, ProbeCases = _context_types()
        anchors = list(concept.expanded_forget_anchors())[:4]
        latents = []
        for k, prompt in enumerate(anchors):
            out = ctx.original(prompt=prompt, num_inference_steps=ctx.settings.steps, guidance_scale=ctx.settings.guidance_scale,
                               generator=torch.Generator().manual_seed(10_000 + k), output_type="latent")
            latents.append(out.images)
        result = soft_prompt_attack(ctx.edited, torch.cat(latents), init_prompt=anchors[0], budget=ctx.settings.attack_budget,
                                    seed=ctx.seed)
        labels, texts = ctx.concept_labels(concept)
        desc = f"<soft prompt: {anchors[0]!r} with 4 optimised tokens>"
        attack = {"budget": result.budget, "steps_used": result.steps_used, "seed": result.seed, "prompt": None,
                  "embedding_tokens": 4, "init_prompt": anchors[0], "score": result.score, "seconds": result.seconds}
        return ProbeCases([ProbeCase(desc, concept.label, labels, texts, prompt_embeds=result.prompt_embeds.detach())], attack=attack,
                          images_per_prompt=ctx.settings.attack_images)


class RECEProbe:
    """RECE's closed-form recovery embedding: the context that makes the edited K/V reproduce the
    original K/V of the concept prompt (linear algebra only)."""
    name, kind = "rece", "target"

    def cases(self, ctx, concept):
        from safeguard.attacks import rece_embedding

        ProbeCase, ProbeCases = _context_types()
        labels, texts = ctx.concept_labels(concept)
        prompts = list(concept.expanded_forget_anchors())[:2]
        cases, scores = [], []
        for prompt in prompts:
            result = rece_embedding(ctx.original, ctx.edited, prompt)
            scores.append(result.score)
            cases.append(ProbeCase(f"<RECE recovery of {prompt!r}>", concept.label, labels, texts, prompt_embeds=result.prompt_embeds.detach()))
        attack = {"budget": 1, "steps_used": 1, "seed": None, "prompt": None, "embedding_tokens": int(cases[0].prompt_embeds.shape[1]),
                  "score": sum(scores) / len(scores), "note": "score = relative K/V residual after recovery (0 = fully recovered)"}
        return ProbeCases(cases, attack=attack, images_per_prompt=max(1, ctx.settings.attack_images // len(cases)))


BUILTIN_PROBES = (CanonicalProbe, ParaphraseProbe, ReplayProbe, NeighboursProbe, KeepProbe, RingABellProbe, SoftPromptProbe, RECEProbe)


@hookimpl
def register_probes(register):
    for probe in BUILTIN_PROBES:
        register(probe)
