"""Cross-attention discovery and activation capture on the tiny SD1, SDXL and PixArt pipelines."""
import pytest
import torch

from safeguard.attention import (
    ActivationRecorder,
    CrossAttentionCaptureProcessor,
    capture_activations,
    capture_per_prompt,
    capture_prompt_activations,
    capturing_cross_attention,
    cross_attention_modules,
    denoiser_of,
)

KINDS = ["sd1", "sdxl", "pixart"]
PROMPTS = ["a photo of pikachu", "a cat in a garden"]


def _latents(pipe, prompts, seed=0, steps=3, guidance_scale=5.0):
    return pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
        generator=[torch.Generator().manual_seed(seed) for _ in prompts], output_type="latent",
    ).images


@pytest.mark.parametrize("kind, count", [("sd1", 4), ("sd1-bert", 4), ("sdxl", 4), ("pixart", 2)])
def test_cross_attention_modules_are_the_text_attention_layers(tiny_pipe, kind, count):
    denoiser = denoiser_of(tiny_pipe(kind))
    found = cross_attention_modules(denoiser)
    # In these architectures every text attention is a transformer block's attn2 (attn1 is self-attention);
    # the discovery itself never looks at names.
    expected = {name for name, _ in denoiser.named_modules() if name.endswith(".attn2")}
    assert set(found) == expected
    assert len(found) == count
    for path, module in found.items():
        assert denoiser.get_submodule(path) is module
        assert module.is_cross_attention


def test_denoiser_of(tiny_pipe):
    sd1, pixart = tiny_pipe("sd1"), tiny_pipe("pixart")
    assert denoiser_of(sd1) is sd1.unet
    assert denoiser_of(pixart) is pixart.transformer
    with pytest.raises(TypeError):
        denoiser_of(object())


@pytest.mark.parametrize("kind", KINDS)
def test_capture_rows_and_width(tiny_pipe, kind):
    pipe = tiny_pipe(kind)
    layers = cross_attention_modules(denoiser_of(pipe))
    rows = capture_activations(pipe, PROMPTS, steps=3, seeds=[0, 1], guidance_scale=5.0)
    assert set(rows) == set(layers)
    for path, matrix in rows.items():
        assert matrix.shape == (len(PROMPTS) * 2 * 3, layers[path].to_out[0].in_features)
        assert matrix.dtype == torch.float32 and matrix.device.type == "cpu"
        assert torch.isfinite(matrix).all()

    per_prompt = capture_prompt_activations(pipe, PROMPTS, steps=3, seeds=[0, 1], guidance_scale=5.0)
    for path, tensor in per_prompt.items():
        assert tensor.shape == (len(PROMPTS), 2 * 3, layers[path].inner_dim)
        assert torch.equal(tensor.reshape(-1, tensor.shape[-1]), rows[path])

    by_prompt = capture_per_prompt(pipe, [*PROMPTS, PROMPTS[0]], steps=3, seeds=[0, 1], guidance_scale=5.0)
    assert list(by_prompt) == PROMPTS
    for i, prompt in enumerate(PROMPTS):
        for path in layers:
            assert torch.equal(by_prompt[prompt][path], per_prompt[path][i])


@pytest.mark.parametrize("kind", KINDS)
def test_capture_restores_the_original_processor_objects(tiny_pipe, kind):
    denoiser = denoiser_of(pipe := tiny_pipe(kind))
    before = dict(denoiser.attn_processors)
    cross = {f"{path}.processor" for path in cross_attention_modules(denoiser)}

    recorder = ActivationRecorder()
    with capturing_cross_attention(denoiser, recorder):
        during = denoiser.attn_processors
        for key, processor in during.items():
            if key in cross:
                assert isinstance(processor, CrossAttentionCaptureProcessor)
            else:
                assert processor is before[key]  # self-attention keeps its own processor
    after = denoiser.attn_processors
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)

    capture_activations(pipe, PROMPTS[:1], steps=2, seeds=[0], guidance_scale=5.0)
    assert all(denoiser.attn_processors[key] is before[key] for key in before)


def test_capture_restores_processors_when_the_block_raises(tiny_pipe):
    denoiser = denoiser_of(tiny_pipe("sd1"))
    before = dict(denoiser.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with capturing_cross_attention(denoiser, ActivationRecorder()):
            raise RuntimeError("boom")
    assert all(denoiser.attn_processors[key] is before[key] for key in before)


@pytest.mark.parametrize("kind", KINDS)
def test_capture_does_not_change_the_computation(tiny_pipe, kind):
    pipe = tiny_pipe(kind)
    plain = _latents(pipe, PROMPTS)
    recorder = ActivationRecorder(conditional_batch=len(PROMPTS))
    with capturing_cross_attention(denoiser_of(pipe), recorder):
        captured = _latents(pipe, PROMPTS)
    assert recorder.rows  # the processors did run
    assert torch.equal(plain, captured)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_are_pooled_pre_to_out_outputs_of_the_conditional_half(tiny_pipe, kind):
    # Independent reference: the input of to_out[0] (heads concatenated), seen through a forward pre-hook.
    pipe = tiny_pipe(kind)
    layers = cross_attention_modules(denoiser_of(pipe))
    seen: dict[str, list[torch.Tensor]] = {path: [] for path in layers}
    handles = [
        attn.to_out[0].register_forward_pre_hook(lambda module, args, path=path: seen[path].append(args[0].clone()))
        for path, attn in layers.items()
    ]
    try:
        rows = capture_prompt_activations(pipe, PROMPTS, steps=2, seeds=[3], guidance_scale=5.0)
    finally:
        for handle in handles:
            handle.remove()
    n = len(PROMPTS)
    for path, inputs in seen.items():
        assert len(inputs) == 2 and inputs[0].shape[0] == 2 * n  # [uncond; cond] with guidance
        expected = torch.stack([x[n:].mean(dim=1) for x in inputs], dim=1)  # [prompts, evaluations, width]
        torch.testing.assert_close(rows[path], expected, rtol=1e-5, atol=1e-6)


def test_conditional_rows_match_a_run_without_guidance(tiny_pipe):
    # The first evaluation sees the same latent and text with and without guidance; only the batch differs.
    pipe = tiny_pipe("sd1")
    guided = capture_prompt_activations(pipe, PROMPTS, steps=2, seeds=[0], guidance_scale=5.0)
    unguided = capture_prompt_activations(pipe, PROMPTS, steps=2, seeds=[0], guidance_scale=1.0)
    for path in guided:
        torch.testing.assert_close(guided[path][:, 0], unguided[path][:, 0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(guided[path][:, 1], unguided[path][:, 1])  # trajectories then diverge


def test_rows_do_not_depend_on_batching(tiny_pipe):
    pipe = tiny_pipe("sd1")
    prompts = [*PROMPTS, "a painting of a tree"]
    batched = capture_prompt_activations(pipe, prompts, steps=2, seeds=[0, 5], guidance_scale=5.0, batch_size=2)
    for i, prompt in enumerate(prompts):
        alone = capture_prompt_activations(pipe, [prompt], steps=2, seeds=[0, 5], guidance_scale=5.0)
        for path in batched:
            torch.testing.assert_close(batched[path][i], alone[path][0], rtol=1e-5, atol=1e-6)


def test_capture_refuses_processors_it_does_not_reproduce(tiny_pipe):
    from diffusers.models.attention_processor import AttnProcessor

    pipe = tiny_pipe("sd1")
    denoiser = denoiser_of(pipe)
    denoiser.set_attn_processor(AttnProcessor())
    before = dict(denoiser.attn_processors)
    with pytest.raises(TypeError, match="AttnProcessor2_0"):
        capture_activations(pipe, PROMPTS, steps=1, seeds=[0], guidance_scale=5.0)
    assert all(denoiser.attn_processors[key] is before[key] for key in before)


def test_recorder_rejects_an_unexpected_batch():
    recorder = ActivationRecorder(conditional_batch=2)
    recorder.record("layer", torch.ones(4, 3))  # guided: keeps the second half
    assert recorder.evaluations("layer").shape == (1, 2, 3)
    with pytest.raises(RuntimeError, match="batch of 3"):
        recorder.record("layer", torch.ones(3, 3))


@pytest.mark.parametrize("kind", KINDS)
def test_capture_conditions_each_batch_exactly_as_its_prompts_would(tiny_pipe, kind):
    # Capture encodes a batch once and reuses the embeddings for every seed; the pipeline must then denoise
    # exactly as it does from the prompts themselves (SDXL: with the pooled embeddings too).
    from safeguard.attention import _prompt_conditioning

    pipe = tiny_pipe(kind)
    conditioning = _prompt_conditioning(pipe, PROMPTS, guidance_scale=5.0)
    from_embeddings = pipe(**conditioning, num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                           generator=[torch.Generator().manual_seed(0) for _ in PROMPTS]).images
    assert torch.equal(from_embeddings, _latents(pipe, PROMPTS))
    if kind != "pixart":  # PixArt needs its attention masks, so it is called with the prompts
        assert "prompt" not in conditioning
