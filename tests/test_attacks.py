"""The live attacks on tiny pipelines: determinism, progress of each objective, and usable outputs."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from safeguard.attacks import (
    AttackResult, ProjectionPair, kv_projection_pairs, rece_embedding, rece_recover, rece_residual,
    render_embeddings, ring_a_bell, soft_prompt_attack,
)
from safeguard.attention import cross_attention_modules
from safeguard.errors import ModelError

torch.set_num_threads(1)

CONCEPT_PROMPTS = ["a photo of pikachu", "a painting of pikachu in the garden", "pikachu on the beach"]
NEUTRAL_PROMPTS = ["a photo of", "a painting of in the garden", "on the beach"]


def _encode(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt=[prompt], device=pipe.device, num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0]


def _weights(*modules) -> list[torch.Tensor]:
    return [t.detach().clone() for m in modules for t in m.state_dict().values()]


def _renders(pipe, result: AttackResult) -> None:
    """The attack's context drives the pipeline (2 steps, with guidance) and yields one image per seed."""
    images = render_embeddings(pipe, result.prompt_embeds, seeds=[0, 1], steps=2, guidance_scale=5.0,
                               pooled_prompt_embeds=result.pooled_prompt_embeds)
    assert len(images) == 2 and all(image.size == images[0].size for image in images)


def _concept_latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- Ring-A-Bell
@pytest.mark.parametrize("kind", ["sd1-bert", "sd1"])
def test_ring_a_bell_improves_monotonically_and_never_spells_the_concept(tiny_pipe, kind):
    pipe = tiny_pipe(kind)
    result = ring_a_bell(pipe, CONCEPT_PROMPTS, NEUTRAL_PROMPTS, budget=15, seed=0, population=16)

    assert result.steps_used == result.budget == len(result.history) == 15
    assert all(later >= earlier for earlier, later in zip(result.history, result.history[1:]))
    assert result.history[-1] > result.details["initial_best"]  # the search found better prompts
    assert result.score == result.history[-1]
    # Banned words come from the pairs by default, and no token containing one is used.
    assert result.details["banned_words"] == ["pikachu"]
    assert "pikachu" in result.details["excluded_tokens"]
    assert "pikachu" not in result.prompt.lower()
    assert len(pipe.tokenizer(result.prompt, add_special_tokens=False)["input_ids"]) == 8
    assert result.prompt_embeds is None
    pipe(result.prompt, num_inference_steps=2, guidance_scale=5.0, output_type="latent")


def test_ring_a_bell_on_a_masked_text_encoder_pipeline(tiny_pipe):
    pipe = tiny_pipe("pixart")
    result = ring_a_bell(pipe, CONCEPT_PROMPTS, NEUTRAL_PROMPTS, budget=4, seed=0, population=8, length=4)
    assert "pikachu" not in result.prompt and result.history[-1] >= result.details["initial_best"]
    with pytest.raises(ModelError, match="UNet2DConditionModel"):
        rece_embedding(pipe, pipe, "a photo of pikachu")


def test_ring_a_bell_score_is_the_cosine_of_the_returned_prompt(tiny_pipe):
    pipe = tiny_pipe("sd1-bert")
    eta = 3.0
    result = ring_a_bell(pipe, CONCEPT_PROMPTS, NEUTRAL_PROMPTS, budget=5, seed=1, population=8, eta=eta)
    with torch.no_grad():
        concept = torch.cat([_encode(pipe, p) for p in CONCEPT_PROMPTS]).flatten(1)
        neutral = torch.cat([_encode(pipe, p) for p in NEUTRAL_PROMPTS]).flatten(1)
        target = neutral[0] + eta * (concept - neutral).mean(0)
        found = _encode(pipe, result.prompt).flatten()
    assert torch.nn.functional.cosine_similarity(found, target, dim=0).item() == pytest.approx(result.score, abs=1e-5)


def test_ring_a_bell_is_deterministic_in_seed(tiny_pipe):
    pipe = tiny_pipe("sd1-bert")
    first = ring_a_bell(pipe, CONCEPT_PROMPTS, NEUTRAL_PROMPTS, budget=6, seed=3, population=8, compare="mean")
    again = ring_a_bell(pipe, CONCEPT_PROMPTS, NEUTRAL_PROMPTS, budget=6, seed=3, population=8, compare="mean")
    other = ring_a_bell(pipe, CONCEPT_PROMPTS, NEUTRAL_PROMPTS, budget=6, seed=4, population=8, compare="mean")
    assert (first.prompt, first.history) == (again.prompt, again.history)
    assert first.history != other.history


def test_ring_a_bell_banned_word_filter_is_what_keeps_the_concept_out(tiny_pipe):
    pipe = tiny_pipe("sd1-bert")
    vocab = ["pikachu", "cat", "dog", "tree"]
    filtered = ring_a_bell(pipe, CONCEPT_PROMPTS, NEUTRAL_PROMPTS, budget=3, population=6, length=2, vocab=vocab)
    unfiltered = ring_a_bell(pipe, CONCEPT_PROMPTS, NEUTRAL_PROMPTS, budget=3, population=6, length=2, vocab=vocab,
                             banned_words=())
    assert filtered.details["vocabulary_size"] == 3 and "pikachu" not in filtered.prompt
    assert unfiltered.details["vocabulary_size"] == 4


def test_ring_a_bell_rejects_unpaired_prompts_and_overlong_prompts(tiny_pipe):
    pipe = tiny_pipe("sd1-bert")
    with pytest.raises(ValueError, match="pairs"):
        ring_a_bell(pipe, CONCEPT_PROMPTS, NEUTRAL_PROMPTS[:1])
    with pytest.raises(ValueError, match="length"):
        ring_a_bell(pipe, CONCEPT_PROMPTS, NEUTRAL_PROMPTS, length=pipe.tokenizer.model_max_length)


# ------------------------------------------------------------------------------------------- soft prompt
@pytest.mark.parametrize("scheduler", [
    lambda config: DDPMScheduler.from_config(config, prediction_type="epsilon"),
    # The embedded model's combination: a sampler without get_velocity, predicting v.
    lambda config: DPMSolverMultistepScheduler.from_config(config, prediction_type="v_prediction"),
], ids=["epsilon", "v_prediction"])
def test_soft_prompt_lowers_the_diffusion_loss_without_touching_weights(tiny_pipe, scheduler):
    pipe = tiny_pipe("sd1-bert")
    pipe.scheduler = scheduler(pipe.scheduler.config)
    before = _weights(pipe.unet, pipe.text_encoder, pipe.vae)
    flags = [p.requires_grad for p in pipe.unet.parameters()]

    result = soft_prompt_attack(pipe, _concept_latents(), init_prompt="a photo of", n_tokens=4, budget=20, lr=0.3)

    assert result.details["prediction_type"] == pipe.scheduler.config.prediction_type
    assert result.details["loss_after"] < result.details["loss_before"]
    assert result.score == result.details["loss_after"]
    assert len(result.history) == result.steps_used == 20
    after = _weights(pipe.unet, pipe.text_encoder, pipe.vae)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags

    # The prompt's own positions are untouched; only the trailing padding positions were learned.
    init = _encode(pipe, "a photo of")
    assert result.prompt_embeds.shape == init.shape
    assert torch.equal(result.prompt_embeds[:, :-4], init[:, :-4])
    assert not torch.equal(result.prompt_embeds[:, -4:], init[:, -4:])
    _renders(pipe, result)


def test_soft_prompt_is_deterministic_in_seed(tiny_pipe):
    pipe = tiny_pipe("sd1-bert")
    runs = [soft_prompt_attack(pipe, _concept_latents(), init_prompt="a cat", budget=4, seed=s) for s in (7, 7, 8)]
    assert torch.equal(runs[0].prompt_embeds, runs[1].prompt_embeds) and runs[0].history == runs[1].history
    assert runs[0].history != runs[2].history


def test_soft_prompt_with_no_steps_conditions_exactly_like_the_init_prompt(tiny_pipe):
    pipe = tiny_pipe("sd1-bert")
    result = soft_prompt_attack(pipe, _concept_latents(), init_prompt="a photo of", budget=0)
    assert torch.equal(result.prompt_embeds, _encode(pipe, "a photo of"))
    assert result.details["loss_before"] == result.details["loss_after"]


def test_soft_prompt_on_sdxl_keeps_the_pooled_embedding(tiny_pipe):
    pipe = tiny_pipe("sdxl")
    result = soft_prompt_attack(pipe, _concept_latents(), init_prompt="a photo of", budget=3, lr=0.3)
    assert result.pooled_prompt_embeds is not None and result.prompt_embeds.shape[-1] == 64
    _renders(pipe, result)


def test_soft_prompt_refuses_what_it_cannot_attack(tiny_pipe):
    with pytest.raises(ModelError, match="UNet2DConditionModel"):
        soft_prompt_attack(types.SimpleNamespace(transformer=torch.nn.Linear(2, 2)), _concept_latents(),
                           init_prompt="a photo of")
    pipe = tiny_pipe("sd1-bert")
    with pytest.raises(ValueError, match="n_tokens"):
        soft_prompt_attack(pipe, _concept_latents(), init_prompt="a photo of", n_tokens=14)
    with pytest.raises(ValueError, match="target_latents"):
        soft_prompt_attack(pipe, torch.zeros(1, 3, 8, 8), init_prompt="a photo of")


# -------------------------------------------------------------------------------------------------- RECE
def _edit_kv(pipe, edit) -> None:
    """Replace every cross-attention to_k/to_v weight W by edit(W, generator), in module order."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in cross_attention_modules(pipe.unet).values():
            for proj in (module.to_k, module.to_v):
                proj.weight.copy_(edit(proj.weight.double(), generator).float())


def _project_out_random_directions(pipe) -> list[torch.Tensor]:
    """W′ = (I − ddᵀ)W₀ with a random unit output direction d per projection; returns the d's in order."""
    removed: list[torch.Tensor] = []

    def project_out(weight, generator):
        d = torch.randn(weight.shape[0], generator=generator, dtype=torch.float64)
        d /= d.norm()
        removed.append(d)
        return weight - torch.outer(d, d @ weight)

    _edit_kv(pipe, project_out)
    return removed


def test_rece_on_an_unedited_model_returns_the_prompt_itself(tiny_pipe):
    original, edited = tiny_pipe("sd1-bert"), tiny_pipe("sd1-bert")
    result = rece_embedding(original, edited, "a photo of pikachu", gamma=1e-9)
    context = _encode(original, "a photo of pikachu")
    assert result.details["residual_before"] == 0.0
    assert result.score < 1e-10
    torch.testing.assert_close(result.prompt_embeds, context, atol=1e-5, rtol=1e-5)
    assert result.history == [result.details["residual_before"], result.score]


def test_rece_against_an_output_projection_recovers_all_but_the_removed_direction(tiny_pipe):
    original, edited = tiny_pipe("sd1-bert"), tiny_pipe("sd1-bert")
    removed = _project_out_random_directions(edited)
    result = rece_embedding(original, edited, "a photo of pikachu", gamma=1e-9)
    before = result.details["residual_before"]
    assert before > 1e-4 and result.score <= before + 1e-12

    # What the edit removed (the d-components of W0 c) is all that is missing: outside d, recovery is exact.
    pairs = kv_projection_pairs(original.unet, edited.unet)
    assert len(pairs) == len(removed)
    context = _encode(original, "a photo of pikachu")[0].double()
    lost = sum(float(((context @ p.original_weight.T @ d) ** 2).sum()) for p, d in zip(pairs, removed))
    total = sum(float(((context @ p.original_weight.T) ** 2).sum()) for p in pairs)
    assert result.score == pytest.approx(lost / total, rel=1e-6)
    _renders(edited, result)


def test_rece_recovers_a_context_that_avoids_the_removed_directions_exactly(tiny_pipe):
    original, edited = tiny_pipe("sd1-bert"), tiny_pipe("sd1-bert")
    removed = _project_out_random_directions(edited)
    pairs = kv_projection_pairs(original.unet, edited.unet)
    # Rows c with dᵀW₀c = 0 for every projection never meet the edit, so nothing is lost and c′ = c
    # (up to the float32 rounding of the stored edited weights).
    constraints = torch.stack([p.original_weight.T @ d for p, d in zip(pairs, removed)])
    free_directions = torch.linalg.svd(constraints).Vh[len(pairs):]
    context = torch.randn(5, len(free_directions), generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64) @ free_directions
    assert rece_residual(pairs, context, context) < 1e-12
    torch.testing.assert_close(rece_recover(pairs, context, gamma=1e-9), context, atol=1e-6, rtol=1e-6)


def test_rece_fully_recovers_an_edit_that_only_rescales_an_input_direction(tiny_pipe):
    original, edited = tiny_pipe("sd1-bert"), tiny_pipe("sd1-bert")
    concept = _encode(original, "a photo of pikachu")[0].double().mean(0)
    u = concept / concept.norm()
    _edit_kv(edited, lambda w, g: w - 0.9 * torch.outer(w @ u, u))
    result = rece_embedding(original, edited, "a photo of pikachu", gamma=1e-9)
    assert result.details["residual_before"] > 1e-2
    assert result.score < 1e-8  # the concept is still there, only behind a different embedding
    assert result.details["context_shift"] > 0.1
    _renders(edited, result)


def test_rece_recover_handles_biases_and_a_zero_ridge():
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    b0 = torch.randn(6, generator=generator, dtype=torch.float64)
    remap = torch.randn(4, 4, generator=generator, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    offset = torch.randn(4, generator=generator, dtype=torch.float64)
    # W′ = W₀M, b′ = b₀ + W₀Ms: c′ = M⁻¹c − s reproduces W₀c + b₀ exactly, and is the only c′ that does.
    pair = ProjectionPair("layer.to_k", w0, w0 @ remap, b0, b0 + w0 @ remap @ offset)
    context = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    recovered = rece_recover([pair], context, gamma=0.0)
    torch.testing.assert_close(recovered, context @ torch.linalg.inv(remap).T - offset)
    assert rece_residual([pair], context, recovered) < 1e-20 < rece_residual([pair], context, context)


def test_rece_refuses_mismatched_models(tiny_pipe):
    with pytest.raises(ModelError, match="differ"):
        rece_embedding(tiny_pipe("sd1-bert"), tiny_pipe("sdxl"), "a photo of pikachu")
    with pytest.raises(ValueError, match="gamma"):
        rece_recover([], torch.zeros(1, 2), gamma=-1.0)


def test_attack_summaries_are_json_safe(tiny_pipe):
    original, edited = tiny_pipe("sd1-bert"), tiny_pipe("sd1-bert")
    summary = rece_embedding(original, edited, "a photo of pikachu").summary()
    assert summary["prompt_embeds"]["shape"] == [1, 16, 32]
    json.dumps(summary)
    assert np.isfinite(summary["score"])
