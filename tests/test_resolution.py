"""Capture and probe resolution (eraser params and probes.height/width): honoured, defaulting to the native size."""
import pytest
import torch
from pydantic import ValidationError

from safeguard.contracts import ProbeCase
from safeguard.erasers import ConceptRequest, EraseRequest
from safeguard.plugins import get_erasers
from safeguard.policy import ProbeSettings
from safeguard.probing import render

REQUEST = EraseRequest([ConceptRequest("pikachu", "character", ["a photo of pikachu"], ["a photo of mario"])], [])


def latent_sizes(pipe):
    """Every spatial size the denoiser is called on, recorded by a forward pre-hook."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    return seen, handle


def native_pixels(pipe):
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


@pytest.mark.parametrize("eraser", ["pure", "retain_projection"])
def test_capture_runs_at_the_requested_resolution(tiny_pipe, eraser):
    pipe = tiny_pipe("sd1")
    factor = pipe.vae_scale_factor
    seen, handle = latent_sizes(pipe)
    try:
        get_erasers()[eraser]().erase(pipe, REQUEST, {"steps": 2, "seeds": 1, "height": 32, "width": 24})
    finally:
        handle.remove()
    assert seen and set(seen) == {(32 // factor, 24 // factor)}


def test_capture_defaults_to_the_native_size(tiny_pipe):
    pipe = tiny_pipe("sd1")
    seen, handle = latent_sizes(pipe)
    try:
        get_erasers()["pure"]().erase(pipe, REQUEST, {"steps": 1, "seeds": 1})
    finally:
        handle.remove()
    native = pipe.unet.config.sample_size
    assert set(seen) == {(native, native)}


def test_sizes_must_be_multiples_of_8():
    with pytest.raises(ValidationError, match="multiple of 8"):
        get_erasers()["pure"].Params.model_validate({"height": 60})
    with pytest.raises(ValidationError, match="multiple of 8"):
        ProbeSettings(width=100)


def test_probe_images_have_the_probe_resolution(tiny_pipe):
    pipe = tiny_pipe("sd1")
    case = ProbeCase("a photo of pikachu", "pikachu", ["pikachu", "nothing"], ["pikachu", "nothing"])
    settings = ProbeSettings(steps=1, height=40, width=24)
    images = render(pipe, [case], [1000, 1001], settings)
    assert [im.size for im in images[0]] == [(24, 40), (24, 40)]  # PIL: (width, height)
    default = render(pipe, [case], [1000], ProbeSettings(steps=1))
    assert default[0][0].size == (native_pixels(pipe), native_pixels(pipe))


def test_embedding_cases_render_at_the_probe_resolution_too(tiny_pipe):
    from safeguard.encoding import encode_prompts

    pipe = tiny_pipe("sd1")
    embeds = encode_prompts(pipe, ["a photo of pikachu"]).embeds
    case = ProbeCase("soft prompt", "pikachu", ["pikachu", "nothing"], ["pikachu", "nothing"], prompt_embeds=embeds)
    images = render(pipe, [case], [7], ProbeSettings(steps=1, height=16, width=32))
    assert images[0][0].size == (32, 16)


def test_pixart_captures_and_renders_at_the_size_asked_for_not_its_bin(tiny_pipe):
    pipe = tiny_pipe("pixart")
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        tuple((args[0] if args else kwargs["hidden_states"]).shape[-2:])), with_kwargs=True)
    try:
        # two steps: PixArt's pipeline treats a single step as a distilled (DMD) model
        get_erasers()["pure"]().erase(pipe, REQUEST, {"steps": 2, "seeds": 1, "height": 64, "width": 32})
        case = ProbeCase("a photo of pikachu", "pikachu", ["pikachu", "nothing"], ["pikachu", "nothing"])
        images = render(pipe, [case], [3], ProbeSettings(steps=2, height=64, width=32))
    finally:
        handle.remove()
    factor = pipe.vae_scale_factor
    assert set(seen) == {(64 // factor, 32 // factor)}  # resolution binning would have picked a 256-px bin
    assert images[0][0].size == (32, 64)


def test_sdxl_embedding_cases_render_with_the_empty_prompts_pooled_branch(tiny_pipe):
    from safeguard.encoding import encode_prompts

    pipe = tiny_pipe("sdxl")
    encoded = encode_prompts(pipe, ["a photo of pikachu"])
    case = ProbeCase("soft prompt", "pikachu", ["pikachu", "nothing"], ["pikachu", "nothing"],
                     prompt_embeds=encoded.embeds, pooled_prompt_embeds=encoded.pooled)
    images = render(pipe, [case], [5], ProbeSettings(steps=1))
    assert len(images[0]) == 1
