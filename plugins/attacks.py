"""Live attacks that try to bring an erased concept back out of an edited diffusers pipeline.

Four attacks of rising access, each a plain function that returns an :class:`AttackResult`:

``ring_a_bell``         black-box to the denoiser: a genetic search over discrete prompts whose text embedding
                        points where the concept's embedding would (Ring-A-Bell). Transfers across erasers.
``unlearn_diff_attack`` white-box search, text output: a few discrete prefix tokens before the concept prompt,
                        chosen with the edited denoiser's own diffusion loss on images of the concept
                        (UnlearnDiffAtk). The result is an ordinary prompt anyone could type.
``soft_prompt_attack``  white-box: learns a few context vectors against the edited denoiser's own diffusion
                        loss on images of the concept (CCE style concept inversion).
``rece_embedding``      closed form: the context that makes the edited K/V reproduce the original model's K/V
                        for the concept (RECE), plus how much of the concept is recoverable at all.

Continuous results are context tensors ``[1, L, D]`` that ``pipe(prompt_embeds=...)`` accepts;
:func:`safeguard.encoding.render_embeddings` renders them with the pipeline's own unconditional embedding.
The attack probes of ``probes.py`` are their only callers.
"""
from __future__ import annotations

import inspect
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from safeguard.attention import cross_attention_modules, denoiser_of
from safeguard.encoding import EncodedPrompts, encode_prompts
from safeguard.errors import ModelError
from safeguard.runtime import track

ENCODE_CHUNK = 64  # prompts per text-encoder batch during the genetic search
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class AttackResult:
    name: str
    budget: int  # what the attack was allowed: generations, optimiser steps or closed-form solves
    steps_used: int
    seed: int | None
    prompt: str | None  # discrete attacks
    prompt_embeds: torch.Tensor | None  # continuous attacks: [1, L, D] in the cross-attention context space
    score: float  # the attack's own objective at the end; see ``objective`` for its direction
    history: list[float]
    seconds: float
    objective: str = ""
    # SDXL-style pipelines also condition on a pooled text embedding; continuous attacks keep the prompt's own.
    pooled_prompt_embeds: torch.Tensor | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-safe view for reports and audit records (tensors become shapes)."""
        def plain(value):
            if isinstance(value, torch.Tensor):
                return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, (np.floating, np.integer)):
                return value.item()
            return value

        return plain({
            "name": self.name, "budget": self.budget, "steps_used": self.steps_used, "seed": self.seed,
            "prompt": self.prompt, "prompt_embeds": self.prompt_embeds, "score": self.score,
            "objective": self.objective, "history": self.history, "seconds": self.seconds,
            "pooled_prompt_embeds": self.pooled_prompt_embeds, "details": self.details,
        })


# ------------------------------------------------------------------------------------------ pipeline access
def prompt_token_room(pipe) -> int:
    """How many tokens a prompt may have before the pipeline truncates it."""
    tokenizer = pipe.tokenizer
    limit = tokenizer.model_max_length
    sequence_default = inspect.signature(pipe.encode_prompt).parameters.get("max_sequence_length")
    if sequence_default is not None and isinstance(sequence_default.default, int):
        limit = min(limit, sequence_default.default)
    return limit - tokenizer.num_special_tokens_to_add()


def _require_prompt_space_unet(denoiser, attack: str):
    """The attacks work in the space ``prompt_embeds`` lives in, so the denoiser must read it unprojected."""
    from diffusers import UNet2DConditionModel

    if not isinstance(denoiser, UNet2DConditionModel):
        raise ModelError(f"{attack} needs a UNet2DConditionModel denoiser, got {type(denoiser).__name__}",
                         fix="use ring_a_bell, which needs only the text encoder")
    if getattr(denoiser, "encoder_hid_proj", None) is not None:
        raise ModelError(f"{attack}: this UNet projects the text context (encoder_hid_dim_type="
                         f"{denoiser.config.encoder_hid_dim_type!r}) before cross-attention",
                         fix="use ring_a_bell, which needs only the text encoder")
    kind = denoiser.config.addition_embed_type
    if kind not in (None, "text_time"):
        raise ModelError(f"{attack}: UNet addition_embed_type={kind!r} is not supported",
                         fix="use a Stable Diffusion 1.x/2.x/XL UNet")


def _added_conditioning(pipe, denoiser, pooled: torch.Tensor | None, latents: torch.Tensor):
    """SDXL's extra inputs: the prompt's pooled embedding and the default size/crop ids for this latent size."""
    if denoiser.config.addition_embed_type != "text_time":
        return None
    if pooled is None:
        raise ModelError(f"{type(pipe).__name__} gives no pooled text embedding, but its UNet needs one")
    batch, _, h, w = latents.shape
    scale = getattr(pipe, "vae_scale_factor", 8)
    height, width = h * scale, w * scale
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=denoiser.dtype, device=latents.device)
    return {"text_embeds": pooled.to(latents.device, denoiser.dtype).expand(batch, -1),
            "time_ids": time_ids.expand(batch, -1)}


# --------------------------------------------------------------------------------------------- Ring-A-Bell
def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _derive_banned_words(concept_prompts: Sequence[str], neutral_prompts: Sequence[str]) -> list[str]:
    """Words of three or more letters that occur in the concept prompts and in none of the neutral ones."""
    neutral = {w for p in neutral_prompts for w in _words(p)}
    return sorted({w for p in concept_prompts for w in _words(p) if len(w) >= 3 and w not in neutral})


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]).strip()


def _candidate_tokens(tokenizer, vocab: Sequence[str] | None, banned_words: Sequence[str]):
    """Token ids the search may use, with the text that spells each as exactly that one token.

    A token is kept only if its decoded text tokenizes back to itself, which drops special and unused
    tokens and subword fragments: the returned prompt then encodes to exactly the searched tokens.
    """
    if vocab is None:
        special = set(tokenizer.all_special_ids)
        ids = sorted(i for i in tokenizer.get_vocab().values() if i not in special)
        texts = [_token_text(tokenizer, i) for i in ids]
    else:
        texts = [str(v).strip() for v in vocab]
        ids = [None] * len(texts)
    encoded = tokenizer([t if t else " " for t in texts], add_special_tokens=False)["input_ids"]
    kept: dict[int, str] = {}
    for token_id, text, back in zip(ids, texts, encoded):
        if text and len(back) == 1 and (token_id is None or back[0] == token_id):
            kept.setdefault(back[0], text)

    # Any token containing a banned word is dropped (as MMA-Diffusion and Ring-A-Bell evaluations do). The
    # subword pieces a tokenizer spells a banned word with are fragments, which the round trip above has
    # already dropped, so space-separated tokens can never join into a banned word.
    banned = [w.lower() for phrase in banned_words for w in phrase.split() if w.strip()]
    excluded = {i: t for i, t in kept.items() if any(w in t.lower() for w in banned)}
    allowed = sorted(set(kept) - set(excluded))
    return np.array(allowed, dtype=np.int64), [kept[i] for i in allowed], sorted(excluded.values())


def _prompt_features(pipe, prompts: Sequence[str], compare: str) -> torch.Tensor:
    chunks = []
    for start in range(0, len(prompts), ENCODE_CHUNK):
        encoded = encode_prompts(pipe, prompts[start:start + ENCODE_CHUNK])
        states = encoded.embeds.float()
        if encoded.mask is None:
            chunks.append(states.flatten(1) if compare == "tokens" else states.mean(dim=1))
            continue
        # Masked-out states never reach the denoiser, so they take no part in the comparison.
        mask = encoded.mask.to(states.dtype).unsqueeze(-1)
        states = states * mask
        chunks.append(states.flatten(1) if compare == "tokens" else states.sum(dim=1) / mask.sum(dim=1).clamp_min(1))
    return torch.cat(chunks)


def ring_a_bell(pipe, concept_prompts: Sequence[str], neutral_prompts: Sequence[str], *, budget: int = 40,
                seed: int = 0, length: int = 8, population: int = 24, eta: float = 3.0,
                vocab: Sequence[str] | None = None, banned_words: Sequence[str] | None = None,
                base_prompt: str | None = None, compare: str = "tokens", elite: int | None = None,
                mutation_rate: float = 0.15, tournament: int = 3) -> AttackResult:
    """Ring-A-Bell: search ``length``-token prompts whose embedding matches E(base) + eta * concept vector.

    The concept vector is the mean over the paired prompts of E(concept_prompts[i]) - E(neutral_prompts[i]),
    with E the context ``pipe.encode_prompt`` builds; ``base_prompt`` defaults to ``neutral_prompts[0]``.
    ``compare="tokens"`` scores the cosine over all token states flattened (position by position, which is
    what cross-attention reads, as Ring-A-Bell does); ``"mean"`` compares token-averaged states, which
    ignores where in the sequence the concept sits.

    ``banned_words``: no token containing one of these words (case-insensitive) is used. None derives them
    from the pairs: words of 3+ letters in the concept prompts and in no neutral prompt. Pass ``()`` to
    search the whole vocabulary.

    Genetic search: ``budget`` generations of tournament selection, single-point crossover and per-token
    mutation; the ``elite`` best (default population // 6) survive unchanged, so the best score per
    generation (``history``) never decreases. Deterministic in ``seed``.
    """
    started = time.perf_counter()
    if not concept_prompts or len(concept_prompts) != len(neutral_prompts):
        raise ValueError("ring_a_bell needs the same positive number of concept and neutral prompts (pairs)")
    if compare not in ("tokens", "mean"):
        raise ValueError(f"compare must be 'tokens' or 'mean', not {compare!r}")
    if population < 2 or budget < 0:
        raise ValueError("ring_a_bell needs population >= 2 and budget >= 0")
    tokenizer = pipe.tokenizer
    room = prompt_token_room(pipe)
    if not 1 <= length <= room:
        raise ValueError(f"length must be between 1 and {room} (the prompt context minus special tokens)")
    elite = max(1, population // 6) if elite is None else elite
    if not 1 <= elite < population:
        raise ValueError("elite must be at least 1 and below population")

    if banned_words is None:
        banned_words = _derive_banned_words(concept_prompts, neutral_prompts)
    token_ids, token_texts, excluded = _candidate_tokens(tokenizer, vocab, banned_words)
    if len(token_ids) < 2:
        raise ValueError("fewer than two usable tokens remain after the vocabulary and banned-word filters")

    concept = _prompt_features(pipe, list(concept_prompts), compare)
    neutral = _prompt_features(pipe, list(neutral_prompts), compare)
    base = _prompt_features(pipe, [base_prompt if base_prompt is not None else neutral_prompts[0]], compare)[0]
    target = base + eta * (concept - neutral).mean(dim=0)
    target_unit = F.normalize(target, dim=0)

    def cosine(features: torch.Tensor) -> np.ndarray:
        return (F.normalize(features, dim=1) @ target_unit).double().numpy()

    def spell(genome: np.ndarray) -> str:
        return " ".join(token_texts[g] for g in genome)

    fitness_of: dict[tuple[int, ...], float] = {}

    def evaluate(genomes: np.ndarray) -> np.ndarray:
        fresh = list(dict.fromkeys(tuple(g) for g in genomes.tolist() if tuple(g) not in fitness_of))
        if fresh:
            scores = cosine(_prompt_features(pipe, [spell(np.array(g)) for g in fresh], compare))
            fitness_of.update(zip(fresh, scores.tolist()))
        return np.array([fitness_of[tuple(g)] for g in genomes.tolist()])

    rng = np.random.default_rng(seed)
    genomes = rng.integers(0, len(token_ids), size=(population, length))
    fitness = evaluate(genomes)
    initial_best = float(fitness.max())

    def pick_parent() -> np.ndarray:
        contenders = rng.integers(0, population, size=tournament)
        return genomes[contenders[np.argmax(fitness[contenders])]]

    history: list[float] = []
    for _ in track(range(budget), "attack Ring-A-Bell: generations"):
        order = np.argsort(-fitness, kind="stable")
        genomes, fitness = genomes[order], fitness[order]
        children = np.empty((population - elite, length), dtype=genomes.dtype)
        for k in range(len(children)):
            mother, father = pick_parent(), pick_parent()
            cut = int(rng.integers(1, length)) if length > 1 else 0
            child = np.concatenate([mother[:cut], father[cut:]])
            mutate = rng.random(length) < mutation_rate
            child[mutate] = rng.integers(0, len(token_ids), size=int(mutate.sum()))
            children[k] = child
        genomes = np.concatenate([genomes[:elite], children])
        fitness = np.concatenate([fitness[:elite], evaluate(children)])
        history.append(float(fitness.max()))

    best = genomes[int(np.argmax(fitness))]
    prompt = spell(best)
    concept_reference = cosine(concept)
    return AttackResult(
        name="ring_a_bell", budget=budget, steps_used=budget, seed=seed, prompt=prompt, prompt_embeds=None,
        score=float(fitness.max()), history=history, seconds=time.perf_counter() - started,
        objective="cosine between the prompt's embedding and E(base) + eta * concept vector (higher = closer)",
        details={
            "compare": compare, "eta": eta, "length": length, "population": population, "elite": elite,
            "mutation_rate": mutation_rate, "initial_best": initial_best,
            "token_ids": [int(token_ids[g]) for g in best], "banned_words": list(banned_words),
            "excluded_tokens": excluded, "vocabulary_size": int(len(token_ids)),
            "prompts_encoded": len(fitness_of),
            # What the concept prompts themselves score: the level a prompt naming the concept reaches.
            "concept_prompt_cosine": float(concept_reference.mean()),
        },
    )


# --------------------------------------------------------------------------------------------- soft prompt
def _diffusion_target(schedule, latents, noise, timesteps, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return schedule.get_velocity(latents, noise, timesteps)
    return latents  # "sample"


def _training_schedule(pipe):
    """The training-time forward process of the pipeline's noise schedule, and what the denoiser predicts.

    Sampling schedulers such as DPM-Solver have no ``get_velocity``; their DDPM twin shares the betas and
    the prediction type.
    """
    from diffusers import DDPMScheduler

    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = schedule.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ModelError(f"scheduler prediction_type {prediction_type!r} is not supported",
                         fix=f"use a scheduler with prediction_type {', '.join(PREDICTION_TYPES)}")
    return schedule, prediction_type


def _check_target_latents(denoiser, target_latents: torch.Tensor) -> None:
    if target_latents.ndim != 4 or target_latents.shape[1] != denoiser.config.in_channels:
        raise ValueError(f"target_latents must be [B, {denoiser.config.in_channels}, h, w], "
                         f"got {list(target_latents.shape)}")


@contextmanager
def _frozen(*modules):
    """Eval mode and no parameter gradients for the duration; both restored afterwards."""
    modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in modules]
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for m in modules:
            m.eval().requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for m, mode in zip(modules, modes):
            m.train(mode)


def soft_prompt_attack(pipe, target_latents: torch.Tensor, *, init_prompt: str, n_tokens: int = 4,
                       budget: int = 40, lr: float = 0.05, seed: int = 0, eval_draws: int = 8) -> AttackResult:
    """Learn ``n_tokens`` context vectors that make the (edited) denoiser denoise images of the concept.

    ``target_latents`` [B, C, h, w] are latents of concept images in the scaled space the scheduler works in
    (e.g. ``vae.encode(x).latent_dist.mean * scaling_factor`` of images the original model rendered).
    The context starts as ``init_prompt``'s embedding; its last ``n_tokens`` positions (padding, so the
    prompt's own words stay) become learnable, initialised to their current states, so step 0 conditions
    exactly like ``init_prompt``. Cross-attention has no positional encoding over the context, so learning
    trailing positions is as strong as inserting a prefix, without shifting or dropping the prompt's words.

    Each Adam step draws a timestep per latent and Gaussian noise from a generator seeded with ``seed`` and
    minimises the denoiser's training loss for the scheduler's prediction type (epsilon, v_prediction via a
    DDPM twin's ``get_velocity``, or sample). Only the context vectors receive gradients: every parameter of
    the denoiser is frozen for the duration and restored afterwards, and no weight changes.
    ``score`` is the loss on ``eval_draws`` fixed (timestep, noise) draws per latent after the last step
    (``details['loss_before']`` is the same before the first), which does not depend on one step's draw.
    """
    started = time.perf_counter()
    denoiser = denoiser_of(pipe)
    _require_prompt_space_unet(denoiser, "soft_prompt_attack")
    _check_target_latents(denoiser, target_latents)
    if n_tokens < 1 or budget < 0 or eval_draws < 1:
        raise ValueError("soft_prompt_attack needs n_tokens >= 1, budget >= 0 and eval_draws >= 1")

    device, dtype = denoiser.device, denoiser.dtype
    latents = target_latents.detach().to(device, torch.float32)
    batch = latents.shape[0]
    schedule, prediction_type = _training_schedule(pipe)

    encoded = encode_prompts(pipe, [init_prompt])
    context = encoded.embeds.detach().to(device, torch.float32)
    length = context.shape[1]
    tokenizer = pipe.tokenizer
    used = int(tokenizer(init_prompt, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").attention_mask.sum())
    if n_tokens > length - used:
        raise ValueError(f"init_prompt fills {used} of {length} context positions; n_tokens must be at most "
                         f"{length - used} (use a shorter init_prompt or fewer tokens)")
    fixed = context[:, :length - n_tokens]
    learned = context[:, length - n_tokens:].clone().requires_grad_(True)
    added = _added_conditioning(pipe, denoiser, encoded.pooled, latents)

    generator = torch.Generator(device="cpu").manual_seed(seed)
    timesteps_count = schedule.config.num_train_timesteps

    def draw():
        t = torch.randint(0, timesteps_count, (batch,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        return t.to(device), noise.to(device)

    def loss_at(tokens: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        noisy = schedule.add_noise(latents, noise, t)
        target = _diffusion_target(schedule, latents, noise, t, prediction_type)
        states = torch.cat([fixed, tokens], dim=1).expand(batch, -1, -1)
        pred = denoiser(noisy.to(dtype), t, encoder_hidden_states=states.to(dtype),
                        added_cond_kwargs=added).sample
        return F.mse_loss(pred.float(), target.float())

    evaluation = [draw() for _ in range(eval_draws)]

    def evaluation_loss() -> float:
        with torch.no_grad():
            return float(np.mean([loss_at(learned, t, noise).item() for t, noise in evaluation]))

    history: list[float] = []
    with _frozen(denoiser):
        loss_before = evaluation_loss()
        optimiser = torch.optim.Adam([learned], lr=lr)
        with torch.enable_grad():
            for _ in track(range(budget), "attack soft prompt: optimiser steps"):
                loss = loss_at(learned, *draw())
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                history.append(loss.item())
        loss_after = evaluation_loss()

    prompt_embeds = torch.cat([fixed, learned.detach()], dim=1).to(encoded.embeds.dtype)
    return AttackResult(
        name="soft_prompt", budget=budget, steps_used=len(history), seed=seed, prompt=None,
        prompt_embeds=prompt_embeds, score=loss_after, history=history, seconds=time.perf_counter() - started,
        objective="denoiser's diffusion loss on the target latents (lower = the concept is reproduced)",
        pooled_prompt_embeds=encoded.pooled,
        details={"init_prompt": init_prompt, "n_tokens": n_tokens,
                 "learned_positions": list(range(length - n_tokens, length)), "lr": lr,
                 "prediction_type": prediction_type, "eval_draws": eval_draws,
                 "loss_before": loss_before, "loss_after": loss_after, "latents": batch},
    )


# ---------------------------------------------------------------------------------------- UnlearnDiffAtk
def _find(sequence: Sequence[int], part: Sequence[int]) -> int:
    """Index of the first occurrence of ``part`` in ``sequence``, or -1."""
    n = len(part)
    for start in range(len(sequence) - n + 1):
        if list(sequence[start:start + n]) == list(part):
            return start
    return -1


class _PrefixHook:
    """Forward hook on a text encoder's input-embedding module: ``vectors`` [n, d] replace the embeddings of
    the prefix tokens ``prefix_ids`` wherever that run of ids occurs in a row. The vectors carry the
    gradient; the rest of the encoder runs unchanged."""

    def __init__(self, prefix_ids: Sequence[int], vectors: torch.Tensor):
        self.prefix_ids, self.vectors = list(prefix_ids), vectors
        self.calls = 0

    def __call__(self, module, inputs, output):
        n = len(self.prefix_ids)
        rows = []
        for b, row in enumerate(inputs[0].tolist()):
            start = _find(row, self.prefix_ids)
            if start < 0:
                raise RuntimeError("the prefix tokens are not where the attack put them: the tokenizer merged them "
                                   "with their neighbours")
            rows.append(torch.cat([output[b, :start], self.vectors.to(output.dtype), output[b, start + n:]]))
        self.calls += 1
        return torch.stack(rows)


def unlearn_diff_attack(pipe, target_latents: torch.Tensor, prompt: str, *, n_tokens: int = 5, budget: int = 40,
                        seed: int = 0, lr: float = 3.0, banned_words: Sequence[str] | None = None,
                        vocab: Sequence[str] | None = None, eval_draws: int = 4) -> AttackResult:
    """UnlearnDiffAtk: ``n_tokens`` discrete tokens before ``prompt``, searched with the (edited) denoiser's
    own diffusion loss on ``target_latents`` (images of the concept, e.g. the original model's renders of it
    as ``output_type="latent"`` latents).

    The search is gradient-guided and discrete (PEZ style): the prefix is kept as continuous vectors in the
    text encoder's input-embedding space; every iteration projects each onto its nearest allowed token
    embedding (cosine), encodes ``prefix + " " + prompt`` with those exact tokens, and lets the gradient of
    the loss step the continuous vectors (straight-through). The tokens reach the encoder through a
    forward hook on ``text_encoder.get_input_embeddings()``, removed before returning; nothing is patched.
    Because the projected vectors are the tokens' own embeddings, every iteration's loss is that of a real
    prompt. Each iteration draws one timestep for the whole batch and fresh noise per latent.

    ``lr`` (Adam) is in units of the RMS of the allowed token embeddings, so it means the same for any text
    encoder. ``banned_words``: no prefix token contains one of these (case-insensitive); None bans the
    words of 3+ letters of ``prompt`` itself, ``()`` allows the whole vocabulary. ``vocab`` restricts the
    candidate tokens to these texts.

    Every distinct prefix the search visits (the initial random one included) is scored on ``eval_draws``
    fixed (timestep, noise) draws per latent; the best becomes ``prompt``, and its loss ``score``
    (``details['loss_before']`` is the initial prefix's). ``history`` is the per-iteration loss, which
    depends on each iteration's draw. Deterministic in ``seed``; no weight changes.
    """
    started = time.perf_counter()
    denoiser = denoiser_of(pipe)
    _require_prompt_space_unet(denoiser, "unlearn_diff_attack")
    _check_target_latents(denoiser, target_latents)
    if n_tokens < 1 or budget < 0 or eval_draws < 1 or lr <= 0:
        raise ValueError("unlearn_diff_attack needs n_tokens >= 1, budget >= 0, eval_draws >= 1 and lr > 0")
    encoder = getattr(pipe, "text_encoder", None)
    if encoder is None or not hasattr(encoder, "get_input_embeddings"):
        raise ModelError(f"{type(pipe).__name__} has no text_encoder with input embeddings to attack")
    embedding = encoder.get_input_embeddings()
    tokenizer = pipe.tokenizer
    room = prompt_token_room(pipe)
    used = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if used + n_tokens > room:
        raise ValueError(f"the prompt takes {used} of {room} token positions; n_tokens must be at most {room - used}")

    if banned_words is None:
        banned_words = sorted({w for w in _words(prompt) if len(w) >= 3})
    token_ids, token_texts, excluded = _candidate_tokens(tokenizer, vocab, banned_words)
    table = embedding.weight.detach()
    keep = token_ids < table.shape[0]
    token_ids, token_texts = token_ids[keep], [t for t, k in zip(token_texts, keep) if k]
    if len(token_ids) < 2:
        raise ValueError("fewer than two usable tokens remain after the vocabulary and banned-word filters")
    candidates = table[torch.as_tensor(token_ids)].float()  # [V, d]
    unit_candidates = F.normalize(candidates, dim=1)
    rms = float(candidates.pow(2).mean().sqrt())

    device, dtype = denoiser.device, denoiser.dtype
    latents = target_latents.detach().to(device, torch.float32)
    batch = latents.shape[0]
    schedule, prediction_type = _training_schedule(pipe)
    timesteps_count = schedule.config.num_train_timesteps
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rng = np.random.default_rng(seed)

    def draw(per_latent: bool):
        t = torch.randint(0, timesteps_count, (batch if per_latent else 1,), generator=generator).expand(batch)
        noise = torch.randn(latents.shape, generator=generator)
        return t.to(device), noise.to(device)

    def text_of(prefix: Sequence[int]) -> str:
        return " ".join(token_texts[i] for i in prefix) + " " + prompt

    def loss_of(encoded: EncodedPrompts, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        noisy = schedule.add_noise(latents, noise, t)
        target = _diffusion_target(schedule, latents, noise, t, prediction_type)
        states = encoded.embeds.expand(batch, -1, -1)
        added = _added_conditioning(pipe, denoiser, encoded.pooled, latents)
        pred = denoiser(noisy.to(dtype), t, encoder_hidden_states=states.to(dtype), added_cond_kwargs=added).sample
        return F.mse_loss(pred.float(), target.float())

    evaluation = [draw(per_latent=True) for _ in range(eval_draws)]

    def evaluation_loss(prefix: Sequence[int]) -> float:
        # The prompt text alone, encoded as any user's prompt would be: no hook is involved.
        encoded = encode_prompts(pipe, [text_of(prefix)])
        with torch.no_grad():
            return float(np.mean([loss_of(encoded, t, noise).item() for t, noise in evaluation]))

    start = rng.integers(0, len(token_ids), size=n_tokens)
    vectors = candidates[torch.as_tensor(start)].clone().to(device).requires_grad_(True)
    optimiser = torch.optim.Adam([vectors], lr=lr * rms)
    unit_candidates = unit_candidates.to(device)
    candidates = candidates.to(device)

    def nearest() -> list[int]:
        with torch.no_grad():
            return (F.normalize(vectors, dim=1) @ unit_candidates.T).argmax(dim=1).tolist()

    history: list[float] = []
    visited: dict[tuple[int, ...], None] = {tuple(int(i) for i in start): None}
    with _frozen(*pipe.components.values()):
        for _ in track(range(budget), "attack UnlearnDiffAtk: iterations"):
            prefix = nearest()
            visited.setdefault(tuple(prefix), None)
            # Straight-through: the forward pass sees exactly the tokens' embeddings, the gradient reaches
            # the continuous vectors.
            hook = _PrefixHook([int(token_ids[i]) for i in prefix], candidates[prefix] + (vectors - vectors.detach()))
            handle = embedding.register_forward_hook(hook)
            try:
                with torch.enable_grad():
                    loss = loss_of(encode_prompts(pipe, [text_of(prefix)], grad=True), *draw(per_latent=False))
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
            finally:
                handle.remove()
            if hook.calls != 1:
                raise RuntimeError(f"the text encoder's input embeddings ran {hook.calls} times for one prompt")
            optimiser.step()
            history.append(loss.item())
        visited.setdefault(tuple(nearest()), None)
        scored = {prefix: evaluation_loss(prefix) for prefix in visited}

    best = min(scored, key=scored.get)  # the first visited of equal losses
    initial = next(iter(visited))
    final_prompt = text_of(best)
    return AttackResult(
        name="unlearn_diff_atk", budget=budget, steps_used=len(history), seed=seed, prompt=final_prompt,
        prompt_embeds=None, score=scored[best], history=history, seconds=time.perf_counter() - started,
        objective="denoiser's diffusion loss on the target latents for the found prompt (lower = the concept is "
                  "reproduced)",
        details={"prompt": prompt, "n_tokens": n_tokens, "iterations": budget, "lr": lr,
                 "prefix": " ".join(token_texts[i] for i in best), "prefix_token_ids": [int(token_ids[i]) for i in best],
                 "initial_prefix": " ".join(token_texts[i] for i in initial),
                 "loss_before": scored[initial], "loss_after": scored[best], "candidates_evaluated": len(scored),
                 "eval_draws": eval_draws, "prediction_type": prediction_type, "latents": batch,
                 "banned_words": list(banned_words), "excluded_tokens": excluded,
                 "vocabulary_size": int(len(token_ids))},
    )


# -------------------------------------------------------------------------------------------------- RECE
class ProjectionPair(NamedTuple):
    """One K or V projection before and after the edit (float64 copies)."""
    name: str  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    original_weight: torch.Tensor  # [out, D]
    edited_weight: torch.Tensor
    original_bias: torch.Tensor | None = None
    edited_bias: torch.Tensor | None = None


def kv_projection_pairs(original_denoiser, edited_denoiser) -> list[ProjectionPair]:
    """Every cross-attention to_k and to_v of two denoisers of the same architecture, matched by path."""
    original = cross_attention_modules(original_denoiser)
    edited = cross_attention_modules(edited_denoiser)
    if not original:
        raise ModelError(f"{type(original_denoiser).__name__} has no cross-attention modules")
    if list(original) != list(edited):
        raise ModelError("the original and edited denoisers have different cross-attention modules",
                         fix="compare an edited model with the model it was edited from")
    pairs = []
    for path, module in original.items():
        if module.norm_cross is not None or edited[path].norm_cross is not None:
            # K/V would read a normalised context, which the linear recovery does not model.
            raise ModelError(f"{path} normalises the text context before to_k/to_v, "
                             "which RECE's linear recovery does not model")
        for proj in ("to_k", "to_v"):
            before, after = getattr(module, proj), getattr(edited[path], proj)
            if before.weight.shape != after.weight.shape:
                raise ModelError(f"{path}.{proj}: weight shapes differ ({list(before.weight.shape)} vs "
                                 f"{list(after.weight.shape)})")
            pairs.append(ProjectionPair(f"{path}.{proj}", _float64(before.weight), _float64(after.weight),
                                        _float64(before.bias), _float64(after.bias)))
    return pairs


def _float64(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu", torch.float64)


def _outputs(weight, bias, context):
    out = context @ weight.T
    return out if bias is None else out + bias


def rece_residual(pairs: Sequence[ProjectionPair], original_context: torch.Tensor,
                  candidate_context: torch.Tensor) -> float:
    """Σ‖W′c′ + b′ − W₀c − b₀‖² / Σ‖W₀c + b₀‖² over every projection and token row."""
    c, c_candidate = original_context.double(), candidate_context.double()
    missing = wanted = 0.0
    for p in pairs:
        target = _outputs(p.original_weight, p.original_bias, c)
        missing += float(((_outputs(p.edited_weight, p.edited_bias, c_candidate) - target) ** 2).sum())
        wanted += float((target ** 2).sum())
    return missing / wanted if wanted > 0 else 0.0


def rece_recover(pairs: Sequence[ProjectionPair], context: torch.Tensor, *, gamma: float = 0.1) -> torch.Tensor:
    """RECE's ridge solution c′ = (Σ W′ᵀW′ + γI)⁻¹ Σ W′ᵀ(W₀c + b₀ − b′) for each row c of ``context`` [L, D].

    Without biases this is the paper's (Σ W′ᵀW′ + γI)⁻¹ (Σ W′ᵀW₀) c. Solved in float64; γ = 0 falls back to
    the pseudo-inverse, which picks the minimum-norm c′ when the edited projections lose directions.
    """
    if gamma < 0:
        raise ValueError("gamma must be >= 0")
    c = context.double()
    dim = c.shape[-1]
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    rhs = torch.zeros_like(c)
    for p in pairs:
        if p.edited_weight.shape[1] != dim:
            raise ModelError(f"{p.name} reads {p.edited_weight.shape[1]}-dim context, the prompt has {dim}")
        target = _outputs(p.original_weight, p.original_bias, c)
        if p.edited_bias is not None:
            target = target - p.edited_bias
        gram += p.edited_weight.T @ p.edited_weight
        rhs += target @ p.edited_weight
    if gamma > 0:
        return torch.linalg.solve(gram + gamma * torch.eye(dim, dtype=torch.float64), rhs.T).T
    return rhs @ torch.linalg.pinv(gram, hermitian=True)


def rece_embedding(original_pipe, edited_pipe, prompt: str, *, gamma: float = 0.1) -> AttackResult:
    """RECE's closed-form adversarial context for ``prompt`` against ``edited_pipe``.

    c is the prompt's context as the original pipeline encodes it (every token row); c′ is the ridge
    solution that makes the edited to_k/to_v of every cross-attention reproduce what the original ones
    produced for c. ``score`` is the relative residual of c′ (0 = fully recoverable, 1 = nothing left);
    ``details['residual_before']`` is the same for c itself, i.e. how much the edit removed for this prompt.
    ``gamma`` is RECE's nudity default; it is absolute, so compare it with ``details['gram_scale']``
    (mean eigenvalue of Σ W′ᵀW′): far below it, c′ is almost unregularised.
    """
    started = time.perf_counter()
    original_denoiser, edited_denoiser = denoiser_of(original_pipe), denoiser_of(edited_pipe)
    _require_prompt_space_unet(edited_denoiser, "rece_embedding")
    pairs = kv_projection_pairs(original_denoiser, edited_denoiser)
    encoded = encode_prompts(original_pipe, [prompt])
    context = encoded.embeds[0].detach().cpu().double()
    recovered = rece_recover(pairs, context, gamma=gamma)
    before = rece_residual(pairs, context, context)
    after = rece_residual(pairs, context, recovered)
    gram_scale = sum(float((p.edited_weight ** 2).sum()) for p in pairs) / context.shape[-1]
    prompt_embeds = recovered.unsqueeze(0).to(device=edited_pipe.device, dtype=encoded.embeds.dtype)
    return AttackResult(
        name="rece", budget=1, steps_used=1, seed=None, prompt=None, prompt_embeds=prompt_embeds,
        score=after, history=[before, after], seconds=time.perf_counter() - started,
        objective="relative K/V residual of the recovered context (0 = fully recoverable)",
        pooled_prompt_embeds=encoded.pooled,
        details={"prompt": prompt, "gamma": gamma, "residual_before": before, "residual_after": after,
                 "projections": len(pairs), "gram_scale": gram_scale,
                 "context_shift": float((recovered - context).norm() / context.norm().clamp_min(1e-12))},
    )
