"""Attack-hardened PURE: attack the edited model, add what the attacks found to the forget rows, re-solve.

One round: for every banned concept, the attacks (a soft prompt and/or UnlearnDiffAtk) search the *edited*
model for a context that makes it denoise the original model's images of the concept. The contexts they
find are run through the *original* model, and the activation rows they produce there join the forget
rows; PURE's closed-form edit is then solved again from the original weights. Rounds stop after
``rounds`` or once every attack's loss on the edited model is at least ``stop_ratio`` times the original
model's loss with the concept's plain prompt (the attack no longer finds a context the edit lets through).

Every round's attack losses, rows added and the share of the new rows' energy the previous edit already
removed go into the edit's stats (the audit trail). Hardening seeds start at ``request.seed + 50_000``
and release probes at their own seeds, so an evaluation never replays a hardening attack.

torch is imported inside functions.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

HARDEN_SEED_OFFSET = 50_000
_FUNCTION_WORDS = {"the", "and", "with", "for", "from"}


class HardenParams(BaseModel):
    """How PURE is hardened against the attacks it will be probed with."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(2, ge=1, description="attack-and-re-solve rounds at most")
    attacks: list[Literal["soft_prompt", "unlearn_diff_atk"]] = Field(
        default_factory=lambda: ["soft_prompt", "unlearn_diff_atk"], min_length=1,
        description="attacks run against the edited model every round")
    budget: int = Field(30, ge=1, description="optimiser steps (soft prompt) or search iterations (UnlearnDiffAtk) per attack")
    targets: int = Field(4, ge=1, description="original-model renders of the forget anchors each concept's attacks aim at")
    render_steps: int = Field(20, ge=1, description="denoising steps of those renders")
    restarts: int = Field(2, ge=1, description="attack runs per concept and attack each round, from different seeds")
    stop_ratio: float | None = Field(1.0, gt=0, description="stop once every attack's loss on the edited model is at "
                                     "least this times the original's loss with the plain anchor; null: run every round")


def banned_words(name: str) -> list[str]:
    """Words no UnlearnDiffAtk token may contain: the concept's own name (3+ letters, no function words)."""
    return sorted({w.lower() for w in name.split() if len(w) > 2 and w.lower() not in _FUNCTION_WORDS})


def restore_originals(layers: dict[str, Any], originals: dict[str, Any]) -> None:
    """Write the recorded original ``to_k``/``to_v`` weights and biases back into ``layers``."""
    import torch

    with torch.no_grad():
        for path, attn in layers.items():
            for name in ("to_k", "to_v"):
                projection = getattr(attn, name)
                projection.weight.copy_(originals[f"{path}.{name}.weight"].to(projection.weight))
                if projection.bias is not None:
                    projection.bias.copy_(originals[f"{path}.{name}.bias"].to(projection.bias))


def concept_targets(pipe, request, params: HardenParams, guidance_scale: float) -> list[dict[str, Any]]:
    """Per concept (on the unedited model): the anchors attacked, the original's latents of them and the
    original's diffusion loss on those latents with the plain first anchor (the attacks' reference)."""
    import torch

    from .attacks import soft_prompt_attack

    seed = request.seed + HARDEN_SEED_OFFSET
    out = []
    for index, concept in enumerate(request.concepts):
        anchors = concept.forget_prompts[:params.targets]
        latents = torch.cat([
            pipe(prompt=anchor, num_inference_steps=params.render_steps, guidance_scale=guidance_scale,
                 generator=torch.Generator().manual_seed(seed + 100 * index + k), output_type="latent").images
            for k, anchor in enumerate(anchors)])
        # budget 0: the loss of the plain prompt itself, on the attacks' fixed evaluation draws
        reference = soft_prompt_attack(pipe, latents, init_prompt=anchors[0], budget=0, seed=seed + index).score
        out.append({"concept": concept.name, "anchors": anchors, "latents": latents, "reference_loss": reference})
    return out


def attack_round(pipe, targets: list[dict[str, Any]], params: HardenParams, round_index: int):
    """Run every attack on the (edited) ``pipe``: the contexts and prompts found, and a record per concept."""
    import torch

    from .attacks import soft_prompt_attack, unlearn_diff_attack

    contexts, prompts, record = [], [], {}
    for index, target in enumerate(targets):
        found = []
        for restart in range(params.restarts):
            seed = HARDEN_SEED_OFFSET + 10_000 * round_index + 100 * index + restart
            if "soft_prompt" in params.attacks:
                result = soft_prompt_attack(pipe, target["latents"], init_prompt=target["anchors"][0],
                                            budget=params.budget, seed=seed)
                contexts.append(result.prompt_embeds.detach())
                found.append({"attack": "soft_prompt", "seed": seed, "loss": result.score,
                              "loss_before": result.details["loss_before"]})
            if "unlearn_diff_atk" in params.attacks:
                result = unlearn_diff_attack(pipe, target["latents"], target["anchors"][0], budget=params.budget,
                                             seed=seed, banned_words=banned_words(target["concept"]))
                prompts.append(result.prompt)
                found.append({"attack": "unlearn_diff_atk", "seed": seed, "loss": result.score,
                              "loss_before": result.details["loss_before"], "prompt": result.prompt})
        for entry in found:
            entry["loss_ratio"] = entry["loss"] / target["reference_loss"] if target["reference_loss"] > 0 else None
        record[target["concept"]] = found
    return (torch.cat(contexts) if contexts else None), prompts, record


def attack_rows(pipe, contexts, prompts: list[str], capture: dict[str, Any]) -> dict[str, Any]:
    """Activation rows of the found contexts and prompts on ``pipe`` (the original weights), per layer."""
    import torch

    from safeguard.attention import capture_activations, capture_embedding_activations
    from safeguard.encoding import encode_prompts

    settings = {k: capture[k] for k in ("steps", "guidance_scale", "batch_size", "height", "width")}
    seeds = [capture["seed"] + i for i in range(capture["seeds"])]
    parts: list[dict[str, Any]] = []
    if contexts is not None:
        negative = encode_prompts(pipe, [""], with_negative=True).negative
        per_context = capture_embedding_activations(pipe, contexts, negative_prompt_embeds=negative, seeds=seeds,
                                                    **settings)
        parts.append({layer: rows.reshape(-1, rows.shape[-1]) for layer, rows in per_context.items()})
    if prompts:
        parts.append(capture_activations(pipe, prompts, seeds=seeds, **settings))
    return {layer: torch.cat([part[layer] for part in parts]) for layer in parts[0]}


def removed_share(rows, E) -> float:
    """Share of the energy of ``rows`` that E removes (1 - ‖rows Eᵀ‖² / ‖rows‖²)."""
    import torch

    rows = torch.as_tensor(rows, dtype=torch.float64)
    total = float(rows.square().sum())
    return 1 - float((rows @ E.T).square().sum()) / total if total > 0 else 0.0


def harden(pipe, request, params: HardenParams, *, capture: dict[str, Any], layers: dict[str, Any],
           originals: dict[str, Any], H_F: dict[str, Any], solve) -> tuple[Any, dict[str, Any]]:
    """Edit the unedited ``pipe`` and harden the edit. ``solve(H_F)`` applies the edit solved from ``H_F`` to
    the original weights (recording them in ``originals``) and returns ``(its result, {layer: E})``.
    Returns the last solve's result and the hardening record."""
    import torch

    started = time.perf_counter()
    targets = concept_targets(pipe, request, params, capture["guidance_scale"])
    result, operators = solve(H_F)
    rounds = []
    for round_index in range(1, params.rounds + 1):
        round_started = time.perf_counter()
        contexts, prompts, record = attack_round(pipe, targets, params, round_index)
        ratios = [entry["loss_ratio"] for found in record.values() for entry in found if entry["loss_ratio"] is not None]
        if params.stop_ratio is not None and ratios and min(ratios) >= params.stop_ratio:
            rounds.append({"round": round_index, "attacks": record, "stopped": "every attack at or above stop_ratio",
                           "seconds": time.perf_counter() - round_started})
            break
        restore_originals(layers, originals)  # the rows are what the original model does with these contexts
        new_rows = attack_rows(pipe, contexts, prompts, capture)
        already_removed = {layer: removed_share(rows, operators[layer]) for layer, rows in new_rows.items()}
        H_F = {layer: torch.cat([H_F[layer], new_rows[layer].to(H_F[layer].dtype)]) for layer in H_F}
        result, operators = solve(H_F)
        rounds.append({
            "round": round_index, "attacks": record,
            "rows_added_per_layer": int(next(iter(new_rows.values())).shape[0]),
            "removed_by_previous_edit": already_removed,
            "removed_by_this_edit": {layer: removed_share(rows, operators[layer]) for layer, rows in new_rows.items()},
            "seconds": time.perf_counter() - round_started,
        })
    record = {"params": params.model_dump(), "seed": request.seed + HARDEN_SEED_OFFSET,
              "reference_loss": {t["concept"]: t["reference_loss"] for t in targets},
              "rounds": rounds, "seconds": time.perf_counter() - started}
    return result, record
