"""Denoisers without cross-attention (MMDiT: Stable Diffusion 3, Flux) are refused in one line that says why."""
import pytest
from click.testing import CliRunner

from fixtures import TEXT_WIDTH, _clip_text_config, clip_tokenizer, t5_tokenizer
from safeguard.attention import check_editable
from safeguard.cli import cli
from safeguard.errors import ModelError

import diffusers  # SD3Transformer2DModel and FluxTransformer2DModel are in every diffusers pyproject allows


def tiny_sd3_transformer():
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=2 * TEXT_WIDTH)


def save_tiny_sd3(folder):
    """A StableDiffusion3Pipeline of tiny components built from configs (it is loaded, never run)."""
    import torch
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    tokenizer_3.model_max_length = 16
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=2 * TEXT_WIDTH, d_kv=8, d_ff=64, num_layers=1,
                                 num_heads=2, relative_attention_num_buckets=8, pad_token_id=tokenizer_3.pad_token_id,
                                 eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=tokenizer_3.pad_token_id))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  layers_per_block=1, norm_num_groups=4, sample_size=16)
    diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=CLIPTextModelWithProjection(_clip_text_config(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tokenizer_2)), tokenizer_2=tokenizer_2,
        text_encoder_3=t5, tokenizer_3=tokenizer_3,
    ).save_pretrained(folder)


def test_sd3_apply_is_refused_in_one_line_saying_why(tmp_path, monkeypatch):
    save_tiny_sd3(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEGUARD_DB", f"sqlite:///{tmp_path}/audit.db")
    (tmp_path / "policy.yaml").write_text(
        "version: 1\nname: sd3\nmodel: {source: model}\neraser: {name: pure, params: {steps: 1, seeds: 1}}\n"
        "concepts: [{name: pikachu, category: character, forget_anchors: [a photo of pikachu]}]\n")
    result = CliRunner().invoke(cli, ["apply", "policy.yaml"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    line = result.output
    assert "SD3Transformer2DModel is an MMDiT" in line and "not supported" in line
    assert "no separate text-conditioned keys and values" in line and "model.source" in line
    assert not (tmp_path / "edited").exists()


def test_flux_transformer_is_refused_too():
    flux = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                            pooled_projection_dim=32, axes_dims_rope=(2, 2, 4))
    with pytest.raises(ModelError, match="FluxTransformer2DModel is an MMDiT"):
        check_editable(flux)


def test_a_denoiser_without_any_text_attention_gets_the_plain_reason():
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                                 norm_num_groups=4, attention_head_dim=4)
    with pytest.raises(ModelError, match="UNet2DModel has no cross-attention layers"):
        check_editable(unet)


def test_cross_attention_denoisers_pass(tiny_pipe):
    for kind in ("sd1", "sdxl", "pixart"):
        pipe = tiny_pipe(kind)
        check_editable(getattr(pipe, "unet", None) or pipe.transformer)
