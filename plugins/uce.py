"""UCE, Unified Concept Editing (Gandikota et al.), as a baseline eraser on the PURE interface.

Text-space closed form, in the form of the reference implementation (a ridge term on top of the paper's two
sums), solved for every cross-attention ``to_k`` and ``to_v``:

    W* = (λ W0 + s_e Σ_i v*_i k_iᵀ + s_p Σ_j W0 k_j k_jᵀ) (λ I + s_e Σ_i k_i k_iᵀ + s_p Σ_j k_j k_jᵀ)⁻¹,
    v*_i = W0 k_guide(i)

k_i is the key of the concept's last subject token in each forget prompt, k_guide(i) the last content token
of the guide text ("" gives the sequence's first token, as in the reference code), k_j the last content
token of each retain prompt. Keys are the encoder states the cross-attention layers see: the pipeline's own
``encode_prompt`` output (both encoders concatenated for SDXL), passed through the denoiser's text
projection where it has one (PixArt) and through each layer's ``norm_cross`` where it has one. Biases are
left alone: the fit is on W k, and the bias is common to the original and the target.

torch is imported inside functions: ``safeguard plugins`` lists this module without loading torch.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from safeguard import hookimpl
from safeguard.erasers import EraseRequest, EraseResult, LayerEdit, replace_weight

STYLE_GUIDE = "art"  # the reference code's guide for artistic styles


class UceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lam: float = Field(0.5, ge=0, description="ridge weight λ that pulls W* towards the original W0")
    erase_scale: float = Field(1.0, ge=0, description="weight s_e of the erase terms")
    preserve_scale: float = Field(1.0, ge=0, description="weight s_p of the preserve (retain) terms")
    guide: str | None = Field(
        None, description="text the erased keys are mapped to; default '' for every category but style, "
                          f"which uses {STYLE_GUIDE!r}",
    )
    token: Literal["last_subject"] = Field(
        "last_subject", description="which token of a forget prompt is the key: the last token of the concept name",
    )


# --------------------------------------------------------------------------------------------- tokens
def _special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids)


def _input_ids(tokenizer, text: str, max_length: int) -> list[int]:
    # The same truncation the pipeline's encode_prompt applies; padding only appends, so positions agree.
    return tokenizer(text, truncation=True, max_length=max_length)["input_ids"]


def content_positions(tokenizer, text: str, max_length: int) -> list[int]:
    """Positions of the non-special tokens of ``text`` (no BOS/EOS/[CLS]/[SEP]/pad) in the encoded sequence."""
    special = _special_ids(tokenizer)
    return [i for i, token in enumerate(_input_ids(tokenizer, text, max_length)) if token not in special]


def last_content_position(tokenizer, text: str, max_length: int) -> int:
    """The last non-special token of ``text``; 0 (the sequence's first token) when there is none, e.g. ``""``."""
    positions = content_positions(tokenizer, text, max_length)
    return positions[-1] if positions else 0


def subject_position(tokenizer, prompt: str, subject: str, max_length: int) -> int | None:
    """Position of the last token of the last occurrence of ``subject`` inside ``prompt``, or None."""
    special = _special_ids(tokenizer)
    ids = _input_ids(tokenizer, prompt, max_length)
    subject_ids = [t for t in tokenizer(subject, add_special_tokens=False)["input_ids"] if t not in special]
    if not subject_ids:
        return None
    for start in range(len(ids) - len(subject_ids), -1, -1):
        if ids[start:start + len(subject_ids)] == subject_ids:
            return start + len(subject_ids) - 1
    return None


# --------------------------------------------------------------------------------------------- text
def _tokenizers(pipe) -> list:
    return [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]


def _execution_device(pipe):
    return getattr(pipe, "_execution_device", None) or pipe.device


def prompt_embeddings(pipe, prompts: Sequence[str]):
    """Text-encoder states ``[len(prompts), sequence, width]`` exactly as the pipeline conditions on them."""
    import torch

    device = _execution_device(pipe)
    with torch.no_grad():
        if hasattr(pipe, "encode_prompt"):
            encoded = pipe.encode_prompt(
                prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            )
            return encoded[0]
        tokenizer = pipe.tokenizer
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids.to(device))[0]


def _check_tokenizers_agree(pipe, texts: Sequence[str], max_length: int) -> None:
    # SDXL concatenates two encoders along the width; a position is only meaningful if both tokenizers
    # place the tokens identically.
    tokenizers = _tokenizers(pipe)
    for other in tokenizers[1:]:
        for text in texts:
            if len(_input_ids(tokenizers[0], text, max_length)) != len(_input_ids(other, text, max_length)):
                raise ValueError(f"the pipeline's tokenizers split {text!r} differently; token positions are ambiguous")


# --------------------------------------------------------------------------------------------- solve
def uce_solve(W0, erase_keys, guide_keys, preserve_keys, lam: float, erase_scale: float, preserve_scale: float):
    """W* of the UCE normal equations, in float64. Keys are rows: ``[n, d_in]``; ``W0`` is ``[d_out, d_in]``."""
    import torch

    W0 = torch.as_tensor(W0).to("cpu", torch.float64)
    K_e = torch.as_tensor(erase_keys).to("cpu", torch.float64).reshape(-1, W0.shape[1])
    K_g = torch.as_tensor(guide_keys).to("cpu", torch.float64).reshape(-1, W0.shape[1])
    K_p = torch.as_tensor(preserve_keys).to("cpu", torch.float64).reshape(-1, W0.shape[1])
    if K_e.shape != K_g.shape:
        raise ValueError("every erase key needs one guide key")
    targets = K_g @ W0.T  # v*_i = W0 k_guide(i), one row per erase key
    lhs = lam * W0 + erase_scale * targets.T @ K_e + preserve_scale * (W0 @ K_p.T) @ K_p
    gram = (lam * torch.eye(W0.shape[1], dtype=torch.float64)
            + erase_scale * K_e.T @ K_e + preserve_scale * K_p.T @ K_p)
    # W* gram = lhs and gram is symmetric, so W*ᵀ = gram⁻¹ lhsᵀ.
    return torch.linalg.solve(gram, lhs.T).T


# --------------------------------------------------------------------------------------------- eraser
class UceEraser:
    """Closed-form text-space K/V edit of every cross-attention layer (UCE, "replace" erasure)."""

    name = "uce"
    version = "1.0.0"
    kind = "weights"
    Params = UceParams

    @classmethod
    def erase(cls, pipe, request: EraseRequest, params: UceParams | dict | None = None) -> EraseResult:
        import torch

        from safeguard.attention import cross_attention_context, cross_attention_modules, denoiser_of

        if not isinstance(params, UceParams):
            params = UceParams.model_validate(params or {})
        started = time.perf_counter()

        denoiser = denoiser_of(pipe)
        layers = cross_attention_modules(denoiser)
        if not layers:
            raise ValueError(f"{type(denoiser).__name__} has no cross-attention layers to edit")
        tokenizers = _tokenizers(pipe)
        if not tokenizers:
            raise TypeError(f"{type(pipe).__name__} has no tokenizer")
        tokenizer = tokenizers[0]

        forget_prompts = [p for c in request.concepts for p in c.forget_prompts]
        if not forget_prompts:
            raise ValueError("UCE needs at least one forget prompt")
        retain_prompts = request.all_retain_prompts
        both = sorted(set(forget_prompts) & set(retain_prompts))
        if both:
            raise ValueError(f"prompts both forgotten and retained: {both}")
        guides = {c.name: params.guide if params.guide is not None else (STYLE_GUIDE if c.category == "style" else "")
                  for c in request.concepts}

        texts = list(dict.fromkeys([*forget_prompts, *guides.values(), *retain_prompts]))
        embeds = prompt_embeddings(pipe, texts)
        with torch.no_grad():
            context = cross_attention_context(denoiser, embeds)
        row_of = {text: i for i, text in enumerate(texts)}
        max_length = context.shape[1]
        _check_tokenizers_agree(pipe, texts, max_length)

        # (text, position) of every key, in the order the sums take them.
        erase_tokens: list[tuple[str, int]] = []
        guide_tokens: list[tuple[str, int]] = []
        subject_fallbacks: list[str] = []
        for concept in request.concepts:
            guide = guides[concept.name]
            guide_token = (guide, last_content_position(tokenizer, guide, max_length))
            for prompt in concept.forget_prompts:
                position = subject_position(tokenizer, prompt, concept.name, max_length)
                if position is None:
                    # The name is not spelled out in this anchor (an alias, another casing): its last token.
                    subject_fallbacks.append(prompt)
                    position = last_content_position(tokenizer, prompt, max_length)
                erase_tokens.append((prompt, position))
                guide_tokens.append(guide_token)
        preserve_tokens = [(p, last_content_position(tokenizer, p, max_length)) for p in retain_prompts]
        encode_seconds = time.perf_counter() - started

        def gather(states, tokens):
            rows = torch.tensor([row_of[text] for text, _ in tokens], dtype=torch.long)
            positions = torch.tensor([position for _, position in tokens], dtype=torch.long)
            return states[rows.to(states.device), positions.to(states.device)].to("cpu", torch.float64)

        edits: list[LayerEdit] = []
        originals: dict[str, Any] = {}
        solve_started = time.perf_counter()
        with torch.no_grad():
            for path, attn in layers.items():
                layer_started = time.perf_counter()
                # norm_cross normalises the encoder states inside the layer, before to_k/to_v.
                states = attn.norm_encoder_hidden_states(context) if attn.norm_cross else context
                K_e = gather(states, erase_tokens)
                K_g = gather(states, guide_tokens)
                K_p = gather(states, preserve_tokens) if preserve_tokens else torch.zeros(0, states.shape[-1])
                stats: dict[str, Any] = {"erase_keys": K_e.shape[0], "preserve_keys": K_p.shape[0]}
                for projection_name in ("to_k", "to_v"):
                    projection = getattr(attn, projection_name)
                    try:
                        solved = uce_solve(projection.weight.detach(), K_e, K_g, K_p, params.lam, params.erase_scale,
                                           params.preserve_scale)
                    except torch.linalg.LinAlgError as exc:
                        raise ValueError(
                            f"UCE's system for {path}.{projection_name} is singular; use lam > 0"
                        ) from exc
                    replace_weight(projection, solved, key=f"{path}.{projection_name}.weight", originals=originals,
                                   stats=stats, short=projection_name.removeprefix("to_"))
                stats["seconds"] = time.perf_counter() - layer_started
                edits.append(LayerEdit(module=path, stats=stats))
        solve_seconds = time.perf_counter() - solve_started

        return EraseResult(
            layers=edits,
            originals=originals,
            stats={
                "seconds": time.perf_counter() - started,
                "encode_seconds": encode_seconds,
                "solve_seconds": solve_seconds,
                "layers": len(edits),
                "erase_keys": len(erase_tokens),
                "preserve_keys": len(preserve_tokens),
                "subject_fallbacks": subject_fallbacks,
                "guides": guides,
                "concepts": {c.name: {"forget_prompts": len(c.forget_prompts), "retain_prompts": len(c.retain_prompts)}
                             for c in request.concepts},
                "params": params.model_dump(),
            },
        )


@hookimpl
def register_erasers(register):
    register(UceEraser)
