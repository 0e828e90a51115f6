"""Text conditioning as the pipeline itself builds it, and rendering from given embeddings.

:func:`encode_prompts` is the one wrapper around ``pipe.encode_prompt`` (erasers, attacks and probes all use
it): it reads the SD, SDXL (pooled embeddings) and PixArt (attention mask) layouts into one
:class:`EncodedPrompts`. :func:`render_embeddings` renders a continuous context, with SDXL's pooled
embedding, exactly as a prompt of that context would render.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

from .errors import ModelError


class EncodedPrompts(NamedTuple):
    embeds: Any  # [prompts, L, D] tensor: what cross-attention reads (before any denoiser projection)
    negative: Any | None  # the unconditional branch, when asked for
    pooled: Any | None = None  # SDXL-style pipelines: the pooled text embedding [prompts, D']
    negative_pooled: Any | None = None
    mask: Any | None = None  # PixArt-style pipelines: which token states the denoiser attends to


def call_parameters(pipe) -> set[str]:
    """The keyword arguments ``pipe(...)`` accepts."""
    return set(inspect.signature(pipe.__call__).parameters)


def encode_prompts(pipe, prompts: Sequence[str], *, with_negative: bool = False, grad: bool = False) -> EncodedPrompts:
    """The context the pipeline builds for ``prompts`` (and, ``with_negative``, its default unconditional branch),
    on the device it computes on.

    ``grad=True`` keeps the autograd graph, so a hook on the text encoder's input embeddings can pass
    gradients back to what it substitutes there. A pipeline without ``encode_prompt`` is encoded with its
    tokenizer and text encoder, padded to the tokenizer's length, as older pipelines do.
    """
    import torch

    from .runtime import execution_device

    device = execution_device(pipe)
    with torch.set_grad_enabled(grad):
        if not hasattr(pipe, "encode_prompt"):
            tokenizer = pipe.tokenizer
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            return EncodedPrompts(pipe.text_encoder(ids.to(device))[0], None)
        out = pipe.encode_prompt(prompt=list(prompts), device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=with_negative)
    params = call_parameters(pipe)
    if "pooled_prompt_embeds" in params:  # SDXL layout: embeds, negative, pooled, negative pooled
        return EncodedPrompts(out[0], out[1], out[2], out[3])
    if "prompt_attention_mask" in params:  # PixArt layout: embeds, mask, negative, negative mask
        return EncodedPrompts(out[0], out[2], mask=out[1])
    return EncodedPrompts(out[0], out[1])


def render_embeddings(pipe, prompt_embeds, *, seeds: Sequence[int], steps: int, guidance_scale: float,
                      pooled_prompt_embeds=None, batch_size: int | None = None, height: int | None = None,
                      width: int | None = None) -> list:
    """Render a continuous context ``[1, L, D]`` once per seed, each seed as ``pipe(..., generator=seed)`` would.

    The unconditional branch is the pipeline's own default (the empty prompt's embedding, or zeros where the
    pipeline forces them), so the images differ from a prompt render only by the context. SDXL-style
    pipelines also need ``pooled_prompt_embeds`` (attack results carry the prompt's own). Generators live
    on the CPU, so a seed starts from the same latent on every device; ``batch_size`` bounds the images
    per pipeline call; ``height`` and ``width`` (None: the model's native size) the resolution.
    """
    import torch

    from .runtime import execution_device

    if not seeds:
        return []
    params = call_parameters(pipe)
    if "prompt_attention_mask" in params:
        raise ModelError(f"{type(pipe).__name__} needs an attention mask with its embeddings; the continuous "
                         "attacks produce Stable Diffusion (UNet) contexts only")
    unconditional = encode_prompts(pipe, [""], with_negative=True)
    expected = [1, *unconditional.negative.shape[1:]]
    if list(prompt_embeds.shape) != expected:
        raise ValueError(f"prompt_embeds must be {expected} for this pipeline, got {list(prompt_embeds.shape)}")
    device, dtype = execution_device(pipe), unconditional.negative.dtype
    kwargs: dict[str, Any] = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    if "pooled_prompt_embeds" in params:
        if pooled_prompt_embeds is None:
            raise ValueError(f"{type(pipe).__name__} needs pooled_prompt_embeds as well")
        kwargs.update(pooled_prompt_embeds=pooled_prompt_embeds.to(device, dtype),
                      negative_pooled_prompt_embeds=unconditional.negative_pooled)
    images = []
    step = batch_size or len(seeds)
    for start in range(0, len(seeds), step):
        chunk = seeds[start:start + step]
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in chunk]
        with torch.no_grad():
            out = pipe(prompt_embeds=prompt_embeds.to(device, dtype), negative_prompt_embeds=unconditional.negative,
                       num_images_per_prompt=len(generators), generator=generators, num_inference_steps=steps,
                       guidance_scale=guidance_scale, output_type="pil", **kwargs)
        images += list(out.images)
    return images
