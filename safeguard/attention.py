"""Cross-attention discovery and activation capture on any diffusers denoiser.

The cross-attention layers are found from the denoiser's own ``attn_processors`` (no layer names are assumed),
so the same code serves SD1.x/SD2.x and SDXL U-Nets and PixArt transformers. Activations are captured by
swapping in :class:`CrossAttentionCaptureProcessor` through ``set_attn_processor`` for the duration of a
normal pipeline call; the pipeline therefore handles scheduling, classifier-free guidance and added
conditioning (SDXL time ids, PixArt resolution) exactly as it does when generating images.

What is recorded is the attention output before ``to_out`` (heads concatenated, width = the layer's inner
dimension), mean-pooled over query positions: one row per prompt per denoiser evaluation, for the
conditional branch only.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, SlicedAttnProcessor
from diffusers.utils import deprecate

from . import runtime

# Processors a capture may stand in for: AttnProcessor2_0 itself and the sliced processor that
# `--attention-slicing` (diffusers' enable_attention_slicing) installs, which computes the same softmax
# attention in chunks of heads.
SAME_AS_SDPA = (AttnProcessor2_0, SlicedAttnProcessor)

__all__ = [
    "ActivationRecorder",
    "CrossAttentionCaptureProcessor",
    "capture_activations",
    "capture_per_prompt",
    "capture_prompt_activations",
    "capturing_cross_attention",
    "check_editable",
    "cross_attention_context",
    "cross_attention_modules",
    "denoiser_of",
]


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's denoising network: ``pipe.unet`` for U-Net pipelines, ``pipe.transformer`` for DiTs."""
    for attribute in ("unet", "transformer"):
        denoiser = getattr(pipe, attribute, None)
        if denoiser is not None:
            return denoiser
    raise TypeError(f"{type(pipe).__name__} has neither a 'unet' nor a 'transformer' component")


def cross_attention_modules(denoiser: torch.nn.Module) -> dict[str, Attention]:
    """Dotted module path -> ``Attention`` module for every layer whose keys and values come from the text.

    Layers are taken from ``denoiser.attn_processors`` (one entry per attention module, keyed
    ``<path>.processor``) and kept when the module is a cross-attention (``is_cross_attention``) that
    projects the encoder states with its own ``to_k``/``to_v``. Added-KV attention (text through
    ``add_k_proj``/``add_v_proj``) is a different computation and is not included.
    """
    modules: dict[str, Attention] = {}
    for key in denoiser.attn_processors:
        path = key.removesuffix(".processor")
        module = denoiser.get_submodule(path)
        if (
            isinstance(module, Attention)
            and module.is_cross_attention
            and getattr(module, "added_kv_proj_dim", None) is None
            and module.to_k is not None
            and module.to_v is not None
        ):
            modules[path] = module
    return modules


def check_editable(denoiser: torch.nn.Module) -> None:
    """Refuse, in one line, a denoiser without cross-attention layers to edit.

    MMDiT transformers (Stable Diffusion 3, Flux) have none: their joint attention runs over one sequence of text
    and image tokens, text keys and values from ``add_k_proj``/``add_v_proj`` and image ones from ``to_k``/``to_v``,
    and every block also rewrites the text tokens from the image. No projection there turns only the prompt into
    the keys and values the image reads, which is what the closed-form edits of ``to_k``/``to_v`` rely on.
    """
    from .errors import ModelError

    processors = getattr(denoiser, "attn_processors", None) or {}
    if processors and cross_attention_modules(denoiser):
        return
    name = type(denoiser).__name__
    joint = any(getattr(denoiser.get_submodule(key.removesuffix(".processor")), "add_k_proj", None) is not None
                for key in processors)
    if joint:
        raise ModelError(f"{name} is an MMDiT (joint attention, as in Stable Diffusion 3 and Flux) and is not supported: "
                         "text and image tokens share one attention, so there are no separate text-conditioned keys and "
                         "values (a cross-attention's to_k/to_v) to project", field="model.source",
                         fix="use a model whose denoiser has cross-attention: SD1.x/2.x, SDXL or PixArt")
    raise ModelError(f"{name} has no cross-attention layers, so there are no text-conditioned keys and values to edit",
                     field="model.source", fix="use a model whose denoiser has cross-attention: SD1.x/2.x, SDXL or PixArt")


def cross_attention_context(denoiser: torch.nn.Module, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """The encoder states the cross-attention layers receive for text-encoder output ``prompt_embeds``.

    Most denoisers pass the text-encoder states straight to cross-attention; some project them first
    (PixArt's ``caption_projection``, a U-Net's ``encoder_hid_proj`` of type "text_proj"). Per-layer
    ``norm_cross`` is applied inside each layer and is not part of this context.
    """
    caption_projection = getattr(denoiser, "caption_projection", None)
    if caption_projection is not None:
        return caption_projection(prompt_embeds)
    encoder_hid_proj = getattr(denoiser, "encoder_hid_proj", None)
    if encoder_hid_proj is not None:
        projection_type = getattr(denoiser.config, "encoder_hid_dim_type", None)
        if projection_type != "text_proj":
            raise TypeError(
                f"the denoiser projects its encoder states with encoder_hid_dim_type={projection_type!r}, "
                "which mixes in non-text inputs; only 'text_proj' is supported"
            )
        return encoder_hid_proj(prompt_embeds)
    return prompt_embeds


class ActivationRecorder:
    """Per-layer rows of pooled cross-attention output, as float32 CPU tensors of shape [prompts, width].

    ``conditional_batch`` is the number of prompts in the current pipeline call. With classifier-free
    guidance the denoiser sees ``2 * conditional_batch`` items ordered [unconditional; conditional] and only
    the conditional half is kept; without guidance all items are kept.
    """

    def __init__(self, conditional_batch: int | None = None):
        self.conditional_batch = conditional_batch
        self.rows: dict[str, list[torch.Tensor]] = defaultdict(list)

    def record(self, layer: str, pooled: torch.Tensor) -> None:
        expected = self.conditional_batch
        if expected is not None:
            batch = pooled.shape[0]
            if batch == 2 * expected:
                pooled = pooled[expected:]
            elif batch != expected:
                raise RuntimeError(
                    f"{layer} ran on a batch of {batch} items while {expected} prompts were expected "
                    f"({expected} without guidance, {2 * expected} with it)"
                )
        self.rows[layer].append(pooled.detach().to("cpu", torch.float32))

    def evaluations(self, layer: str) -> torch.Tensor:
        """Rows of ``layer`` as [evaluations, prompts, width], in call order."""
        return torch.stack(self.rows[layer])

    def clear(self) -> None:
        self.rows.clear()


class CrossAttentionCaptureProcessor:
    """``AttnProcessor2_0`` that also records the pooled attention output before ``to_out``.

    The computation is that of ``diffusers.models.attention_processor.AttnProcessor2_0`` line for line
    (spatial norm, 4-D inputs, attention mask, group norm, norm_cross, q/k norms, residual, rescale), so the
    layer's output is unchanged; the only addition is one mean over query positions handed to the recorder.
    """

    def __init__(self, layer: str, recorder: ActivationRecorder):
        self.layer = layer
        self.recorder = recorder

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecation_message = "The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will raise an error in the future. `scale` should directly be passed while calling the underlying pipeline component i.e., via `cross_attention_kwargs`."
            deprecate("scale", "1.0.0", deprecation_message)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim

        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # scaled_dot_product_attention expects attention_mask shape to be (batch, heads, source, target)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # The recorded activation: heads concatenated, before to_out, averaged over query positions.
        # Accumulating in float32 keeps half-precision models from losing the mean over thousands of positions.
        self.recorder.record(self.layer, hidden_states.mean(dim=1, dtype=torch.float32))

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states


@contextlib.contextmanager
def capturing_cross_attention(
    denoiser: torch.nn.Module,
    recorder: ActivationRecorder,
    layers: Sequence[str] | None = None,
) -> Iterator[ActivationRecorder]:
    """Install capture processors on the cross-attention ``layers`` (default: all) while the block runs.

    Every other attention module keeps its processor object. The original processors are put back on exit,
    also when the block raises.
    """
    modules = cross_attention_modules(denoiser)
    if layers is not None:
        unknown = sorted(set(layers) - set(modules))
        if unknown:
            raise KeyError(f"not cross-attention layers of this denoiser: {', '.join(unknown)}")
        modules = {path: modules[path] for path in layers}
    if not modules:
        raise ValueError(f"{type(denoiser).__name__} has no cross-attention layers to capture")

    originals = denoiser.attn_processors
    for path in modules:
        processor = originals[f"{path}.processor"]
        # The capture reproduces AttnProcessor2_0; another processor (IP-adapter, LoRA, fused...) computes
        # something else, and replacing it would silently change what the model does. Sliced attention
        # computes the same function in chunks; cross-attention layers are small enough to run unsliced.
        if type(processor) not in SAME_AS_SDPA:
            raise TypeError(
                f"{path} uses {type(processor).__name__}; activation capture reproduces AttnProcessor2_0 "
                "only (set it with denoiser.set_attn_processor(AttnProcessor2_0()))"
            )

    processors = dict(originals)
    for path in modules:
        processors[f"{path}.processor"] = CrossAttentionCaptureProcessor(path, recorder)
    # set_attn_processor consumes the dict it is given, hence the copies.
    denoiser.set_attn_processor(processors)
    try:
        yield recorder
    finally:
        denoiser.set_attn_processor(dict(originals))


def size_options(pipe, height: int | None, width: int | None) -> dict[str, Any]:
    """Pipeline keyword arguments that render at ``height`` x ``width`` pixels (None: the pipeline's default, the
    model's native size). A pipeline that snaps sizes to its training resolutions (PixArt's
    ``use_resolution_binning``) is told not to, so the size asked for is the size computed."""
    options = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    if options and pipe is not None:
        import inspect

        if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
            options["use_resolution_binning"] = False
    return options


@contextlib.contextmanager
def _progress_bar_disabled(pipe) -> Iterator[None]:
    """Silence the pipeline's per-step progress bar for the many short calls a capture makes."""
    had_config = hasattr(pipe, "_progress_bar_config")
    previous = dict(pipe._progress_bar_config) if had_config else None
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if had_config:
            pipe._progress_bar_config = previous
        else:
            del pipe._progress_bar_config


def _prompt_conditioning(pipe, batch: list[str], guidance_scale: float) -> dict[str, Any]:
    """What ``pipe`` is called with for ``batch``: its text embeddings, encoded once for every seed (the text
    encoder costs more than a small denoiser's call), or the prompts themselves where the pipeline needs
    more than embeddings (PixArt's attention masks) or cannot take them."""
    from .encoding import call_parameters, encode_prompts

    params = call_parameters(pipe)
    if (not hasattr(pipe, "encode_prompt") or "prompt_embeds" not in params
            or "prompt_attention_mask" in params):
        return {"prompt": batch}
    encoded = encode_prompts(pipe, batch, with_negative=guidance_scale > 1)
    conditioning = {"prompt_embeds": encoded.embeds, "negative_prompt_embeds": encoded.negative}
    if "pooled_prompt_embeds" in params:
        conditioning.update(pooled_prompt_embeds=encoded.pooled, negative_pooled_prompt_embeds=encoded.negative_pooled)
    return conditioning


def capture_prompt_activations(
    pipe,
    prompts: Sequence[str],
    *,
    steps: int,
    seeds: Sequence[int],
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    layers: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Pooled cross-attention outputs per prompt: ``{layer: Tensor[len(prompts), len(seeds) * E, width]}``.

    For every seed, the pipeline itself runs ``steps`` inference steps on a batch of up to ``batch_size``
    prompts (``output_type="latent"``, so nothing is decoded). Each prompt gets its own
    ``torch.Generator().manual_seed(seed)``, so its starting latent, and therefore its rows, do not depend on
    which prompts share its batch (generators live on the CPU, so the rows do not depend on the device
    either, up to the device's arithmetic). ``E`` is the number of denoiser evaluations per trajectory: ``steps`` for
    first-order schedulers (DDIM, Euler, DPM-Solver multistep); PNDM and Heun-type schedulers evaluate more.
    Rows of one prompt are ordered seed by seed, then by evaluation.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("capture needs at least one prompt")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    batches = [prompts[start:start + batch_size] for start in range(0, len(prompts), batch_size)]
    conditionings = ((len(batch), lambda batch=batch: _prompt_conditioning(pipe, batch, guidance_scale))
                     for batch in batches)
    return _capture_batches(pipe, conditionings, len(batches), steps=steps, seeds=seeds,
                            guidance_scale=guidance_scale, height=height, width=width, layers=layers)


def capture_embedding_activations(
    pipe,
    prompt_embeds: torch.Tensor,
    *,
    negative_prompt_embeds: torch.Tensor | None,
    steps: int,
    seeds: Sequence[int],
    guidance_scale: float,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    layers: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The rows of :func:`capture_prompt_activations` for contexts no prompt spells: ``prompt_embeds``
    [N, L, D] (e.g. a soft-prompt attack's result), each with the unconditional ``negative_prompt_embeds``
    [1, L, D] (and SDXL's pooled embeddings, [N, D'] and [1, D'])."""
    from .encoding import call_parameters

    if prompt_embeds.ndim != 3 or len(prompt_embeds) == 0:
        raise ValueError(f"prompt_embeds must be [N >= 1, L, D], got {list(prompt_embeds.shape)}")
    if guidance_scale > 1 and negative_prompt_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_prompt_embeds")
    if "prompt_embeds" not in call_parameters(pipe) or "prompt_attention_mask" in call_parameters(pipe):
        raise ValueError(f"{type(pipe).__name__} cannot be called with prompt embeddings alone")
    chunks = [slice(start, start + batch_size) for start in range(0, len(prompt_embeds), batch_size)]

    def conditioning(chunk: slice) -> dict[str, Any]:
        out = {"prompt_embeds": prompt_embeds[chunk]}
        count = len(out["prompt_embeds"])
        if negative_prompt_embeds is not None:
            out["negative_prompt_embeds"] = negative_prompt_embeds.expand(count, -1, -1)
        if pooled_prompt_embeds is not None:
            out["pooled_prompt_embeds"] = pooled_prompt_embeds[chunk]
            out["negative_pooled_prompt_embeds"] = negative_pooled_prompt_embeds.expand(count, -1)
        return out

    conditionings = ((len(prompt_embeds[chunk]), lambda chunk=chunk: conditioning(chunk)) for chunk in chunks)
    return _capture_batches(pipe, conditionings, len(chunks), steps=steps, seeds=seeds,
                            guidance_scale=guidance_scale, height=height, width=width, layers=layers)


def _capture_batches(pipe, conditionings, batch_count: int, *, steps: int, seeds: Sequence[int],
                     guidance_scale: float, height: int | None, width: int | None,
                     layers: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """Run every ``(size, make_conditioning)`` batch once per seed and collect its rows per prompt."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("capture needs at least one seed")
    if steps < 1:
        raise ValueError("steps must be at least 1")

    denoiser = denoiser_of(pipe)
    recorder = ActivationRecorder()
    per_prompt: dict[str, list[torch.Tensor]] = defaultdict(list)  # layer -> one [seeds * E, width] per prompt
    call_options: dict[str, Any] = size_options(pipe, height, width)

    with (_progress_bar_disabled(pipe), capturing_cross_attention(denoiser, recorder, layers),
          runtime.phase("capturing cross-attention activations (pipeline calls)"),
          runtime.progress("capturing activations", batch_count * len(seeds)) as shown):
        for size, make_conditioning in conditionings:
            by_seed: dict[str, list[torch.Tensor]] = defaultdict(list)  # layer -> [E, batch, width] per seed
            conditioning = make_conditioning()
            for seed in seeds:
                recorder.clear()
                recorder.conditional_batch = size
                pipe(
                    **conditioning,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    generator=[torch.Generator(device="cpu").manual_seed(seed) for _ in range(size)],
                    output_type="latent",
                    **call_options,
                )
                shown.advance()
                for layer in recorder.rows:
                    by_seed[layer].append(recorder.evaluations(layer))
            for layer, runs in by_seed.items():
                # [seeds, E, batch, width] -> [batch, seeds * E, width]
                stacked = torch.stack(runs).permute(2, 0, 1, 3)
                per_prompt[layer].extend(stacked.reshape(size, -1, stacked.shape[-1]).unbind(0))
    return {layer: torch.stack(rows) for layer, rows in per_prompt.items()}


def capture_activations(
    pipe,
    prompts: Sequence[str],
    *,
    steps: int,
    seeds: Sequence[int],
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    layers: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Activation matrices ``{layer: Tensor[len(prompts) * len(seeds) * E, width]}`` (float32, CPU).

    The rows of :func:`capture_prompt_activations`, stacked prompt by prompt.
    """
    per_prompt = capture_prompt_activations(
        pipe, prompts, steps=steps, seeds=seeds, guidance_scale=guidance_scale,
        height=height, width=width, batch_size=batch_size, layers=layers,
    )
    return {layer: rows.reshape(-1, rows.shape[-1]) for layer, rows in per_prompt.items()}


def capture_per_prompt(
    pipe,
    prompts: Sequence[str],
    *,
    steps: int,
    seeds: Sequence[int],
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    layers: Sequence[str] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{prompt: {layer: Tensor[len(seeds) * E, width]}}``: the rows of :func:`capture_prompt_activations`
    looked up by prompt (repeated prompts are captured once)."""
    unique = list(dict.fromkeys(prompts))
    per_layer = capture_prompt_activations(
        pipe, unique, steps=steps, seeds=seeds, guidance_scale=guidance_scale,
        height=height, width=width, batch_size=batch_size, layers=layers,
    )
    return {prompt: {layer: rows[i] for layer, rows in per_layer.items()} for i, prompt in enumerate(unique)}
