"""UCE, Unified Concept Editing (Gandikota et al.), as a baseline eraser on the PURE interface.

This follows the reference implementation (``train-scripts/train_erase.py``, ``edit_model``, with the script's
defaults): a closed form, solved for every cross-attention ``to_k`` and ``to_v``,

    W* = (λ W0 + s_e Σ_e v*_e k_eᵀ + s_p Σ_p W0 k_p k_pᵀ) (λ I + s_e Σ_e k_e k_eᵀ + s_p Σ_p k_p k_pᵀ)⁻¹,
    v*_e = W0 g_e                                         (technique "replace")

with λ = 0.5, s_e = 1 and s_p = 0.1 by default, and these keys (L = the encoder's sequence length, padding
included; positions count from 0; "last content token" = the last token that is not BOS/EOS/[CLS]/[SEP]/
pad: ``attention_mask.sum() - 2`` for the CLIP, BERT and T5 tokenizers; 0 when the text has no content
token, e.g. ``" "``):

* Erase keys k_e and their guide keys g_e. Each erase prompt p is paired with its concept's guide text g.
  With i_p and i_g the last content tokens of p and g and n = L - max(i_p, i_g), the erase keys are the
  states of p at positions i_p, ..., i_p + n - 1 (the last content token, EOS, then padding) and the guide
  keys the states of g at i_g, ..., i_g + n - 1, paired position by position. This is the reference's
  slicing: both slices start at their own last content token and the one that starts earlier is cut
  short at its end, so they have equal length.
* Preserve keys k_p: every position 0, ..., L - 1 (padding included) of every retain prompt (the policy's
  keep list and every concept's neighbour anchors), with values from the unedited layer. With no retain
  prompt at all the empty prompt ``""`` is preserved, as the reference does when it is given no preserve
  concepts.

Erase prompts (``erase_prompts``): ``"names"`` (default) erases each concept's bare name, which is what the
reference script does (``--concepts``); ``"anchors"`` erases the policy's forget anchors instead, the
counterpart of the script's ``--add_prompts`` (which adds five fixed templates of the name to the bare
name) with the policy's own phrasings. Aliases are not erased in ``"names"`` mode.

Guide (``guide``): ``" "`` (an unconditional-like prompt; ``""`` is read as ``" "``, as the reference does)
for every category but style, which uses ``"art"`` as the reference's instructions for artists do
(``--guided_concepts 'art'``); an explicit ``guide`` applies to every concept. The reference preserves
every other artist of its 1,734-artist list when erasing art; here the preserve set is the policy's.

Keys are the encoder states the cross-attention layers see: the pipeline's own ``encode_prompt`` output
(both encoders concatenated for SDXL), passed through the denoiser's text projection where it has one
(PixArt) and through each layer's ``norm_cross`` where it has one. Biases are left alone: the fit is on
W k, and the bias is common to the original and the target. (The reference targets the Linear's output,
bias included; its Stable Diffusion projections have none.) PixArt masks padding positions in
cross-attention, so on PixArt the padding keys are fitted but never read.

torch is imported inside functions: ``safeguard plugins`` lists this module without loading torch.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from safeguard import hookimpl
from safeguard.erasers import EraseRequest, EraseResult, LayerEdit, editable_layers, replace_weight, validated_params

STYLE_GUIDE = "art"  # the reference's guide for artistic styles
DEFAULT_GUIDE = " "  # the reference's guide otherwise (and what it makes of an empty guide)
EMPTY_PRESERVE = ""  # what the reference preserves when it is given nothing to preserve


class UceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lam: float = Field(0.5, ge=0, description="ridge weight λ that pulls W* towards the original W0")
    erase_scale: float = Field(1.0, ge=0, description="weight s_e of the erase terms")
    preserve_scale: float = Field(0.1, ge=0, description="weight s_p of the preserve (retain) terms")
    technique: Literal["replace"] = Field(
        "replace", description="erase targets: 'replace' maps the erase keys to the guide's values W0 g",
    )
    guide: str | None = Field(
        None, description=f"text the erased keys are mapped to; default {DEFAULT_GUIDE!r} for every category "
                          f"but style, which uses {STYLE_GUIDE!r}",
    )
    erase_prompts: Literal["names", "anchors"] = Field(
        "names", description="what is erased: each concept's bare name (the reference's default) or the "
                             "policy's forget anchors (the reference's --add_prompts, with the policy's phrasings)",
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
    """The last non-special token of ``text``; 0 (the sequence's first token) when there is none, e.g. ``" "``.

    For tokenizers that add one start and one end token (CLIP, BERT) this is ``attention_mask.sum() - 2``.
    """
    positions = content_positions(tokenizer, text, max_length)
    return positions[-1] if positions else 0


def erase_positions(tokenizer, prompt: str, guide: str, length: int) -> tuple[list[int], list[int]]:
    """Positions of the erase keys of ``prompt`` and of the guide keys of ``guide`` paired with them.

    Both run from their text's last content token towards the end of the ``length``-long padded sequence;
    the one that starts earlier stops early, so both have ``length - max(start_prompt, start_guide)``
    positions (the reference's slicing).
    """
    start_prompt = last_content_position(tokenizer, prompt, length)
    start_guide = last_content_position(tokenizer, guide, length)
    count = length - max(start_prompt, start_guide)
    return list(range(start_prompt, start_prompt + count)), list(range(start_guide, start_guide + count))


# --------------------------------------------------------------------------------------------- text
def _tokenizers(pipe) -> list:
    return [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]


def prompt_embeddings(pipe, prompts: Sequence[str]):
    """Text-encoder states ``[len(prompts), sequence, width]`` exactly as the pipeline conditions on them."""
    from safeguard.encoding import encode_prompts

    return encode_prompts(pipe, prompts).embeds


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
def concept_guides(request: EraseRequest, params: UceParams) -> dict[str, str]:
    """The guide text of every concept (an empty guide reads as ``" "``, as in the reference)."""
    guides = {}
    for concept in request.concepts:
        guide = params.guide if params.guide is not None else (STYLE_GUIDE if concept.category == "style" else DEFAULT_GUIDE)
        guides[concept.name] = guide if guide != "" else DEFAULT_GUIDE
    return guides


def concept_erase_prompts(request: EraseRequest, params: UceParams) -> dict[str, list[str]]:
    """What each concept erases: its bare name, or its forget anchors."""
    if params.erase_prompts == "names":
        return {c.name: [c.name] for c in request.concepts}
    return {c.name: list(c.forget_prompts) for c in request.concepts}


class UceEraser:
    """Closed-form text-space K/V edit of every cross-attention layer (UCE, "replace" erasure)."""

    name = "uce"
    version = "2.0.0"
    Params = UceParams

    def erase(self, pipe, request: EraseRequest, params: UceParams | dict | None = None) -> EraseResult:
        import torch

        from safeguard.attention import cross_attention_context

        params = validated_params(self, params)
        started = time.perf_counter()

        denoiser, layers = editable_layers(pipe)
        tokenizers = _tokenizers(pipe)
        if not tokenizers:
            raise TypeError(f"{type(pipe).__name__} has no tokenizer")
        tokenizer = tokenizers[0]

        erase_prompts = concept_erase_prompts(request, params)
        if not any(erase_prompts.values()):
            raise ValueError("UCE needs at least one prompt to erase")
        given_retain = request.all_retain_prompts
        both = sorted({p for prompts in erase_prompts.values() for p in prompts} & set(given_retain))
        if both:
            raise ValueError(f"prompts both forgotten and retained: {both}")
        retain_prompts = given_retain or [EMPTY_PRESERVE]
        guides = concept_guides(request, params)

        texts = list(dict.fromkeys([*(p for ps in erase_prompts.values() for p in ps), *guides.values(), *retain_prompts]))
        embeds = prompt_embeddings(pipe, texts)
        with torch.no_grad():
            context = cross_attention_context(denoiser, embeds)
        row_of = {text: i for i, text in enumerate(texts)}
        length = context.shape[1]
        _check_tokenizers_agree(pipe, texts, length)

        # (text row, position) of every key, in the order the sums take them.
        erase_rows: list[int] = []
        erase_at: list[int] = []
        guide_rows: list[int] = []
        guide_at: list[int] = []
        for concept in request.concepts:
            guide = guides[concept.name]
            for prompt in erase_prompts[concept.name]:
                prompt_positions, guide_positions = erase_positions(tokenizer, prompt, guide, length)
                erase_rows += [row_of[prompt]] * len(prompt_positions)
                erase_at += prompt_positions
                guide_rows += [row_of[guide]] * len(guide_positions)
                guide_at += guide_positions
        preserve_rows = [row_of[p] for p in retain_prompts for _ in range(length)]
        preserve_at = [i for _ in retain_prompts for i in range(length)]
        encode_seconds = time.perf_counter() - started

        def gather(states, rows, positions):
            rows = torch.tensor(rows, dtype=torch.long, device=states.device)
            positions = torch.tensor(positions, dtype=torch.long, device=states.device)
            return states[rows, positions].to("cpu", torch.float64)

        edits: list[LayerEdit] = []
        originals: dict[str, Any] = {}
        solve_started = time.perf_counter()
        with torch.no_grad():
            for path, attn in layers.items():
                layer_started = time.perf_counter()
                # norm_cross normalises the encoder states inside the layer, before to_k/to_v.
                states = attn.norm_encoder_hidden_states(context) if attn.norm_cross else context
                K_e = gather(states, erase_rows, erase_at)
                K_g = gather(states, guide_rows, guide_at)
                K_p = gather(states, preserve_rows, preserve_at)
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
                "sequence_length": length,
                "erase_keys": len(erase_at),
                "preserve_keys": len(preserve_at),
                "erase_prompts": erase_prompts,
                "preserve_prompts": len(retain_prompts),
                "preserved_empty_prompt": not given_retain,
                "guides": guides,
                "concepts": {c.name: {"forget_prompts": len(c.forget_prompts), "retain_prompts": len(c.retain_prompts),
                                      "erase_prompts": len(erase_prompts[c.name])}
                             for c in request.concepts},
                "params": params.model_dump(),
            },
        )


@hookimpl
def register_erasers(register):
    register(UceEraser)
