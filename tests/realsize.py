"""Real-size pipelines with random weights, built from configs (no download), for the opt-in slow tests.

    "sd15"    Stable Diffusion 1.x: UNet 860M (16 cross-attention layers), CLIP ViT-L/14 text tower, VAE;
              saved in float16 (the common distribution form)
    "sdxl"    SDXL base: UNet 2.6B (70 cross-attention layers, text-time conditioning), CLIP ViT-L and OpenCLIP
              ViT-bigG text towers (pooled embeddings), VAE; built, saved and run in bfloat16, so the original
              and the edited model fit in memory together (7 GB each)
    "pixart"  PixArt-alpha 512: DiT 600M (28 cross-attention layers, 4096-wide captions); the T5 encoder has
              T5-XXL's width but 2 of its 24 layers (the 4.7B-parameter original does not fit beside it)

The CLIP tokenizers use the real CLIP byte-level BPE vocabulary (49,408 tokens) that open_clip ships; the T5
tokenizer is the small one of tests/fixtures.py. Every builder seeds torch, so a kind is the same each time.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

KINDS = ("sd15", "sdxl", "pixart")
SAVE_DTYPES = {"sd15": "float16", "sdxl": "bfloat16", "pixart": "float32"}


def clip_bpe_tokenizer(folder: Path, model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """CLIP's own tokenizer, from the BPE merges open_clip ships (vocab.json and merges.txt written to ``folder``)."""
    import open_clip
    from transformers import CLIPTokenizer
    from open_clip.tokenizer import bytes_to_unicode

    path = Path(os.path.dirname(open_clip.__file__)) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(p) for p in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length,
                         pad_token=pad_token)


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int, projection: int, act: str, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection,
                            hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(sample_size: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, sample_size=sample_size, scaling_factor=scaling_factor)


def build_sd15(folder: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280))
    return StableDiffusionPipeline(
        vae=_vae(512, 0.18215), unet=unet, tokenizer=clip_bpe_tokenizer(folder / "_tokenizer"),
        text_encoder=_clip_text(768, 12, 12, 3072, 768, "quick_gelu", with_projection=False),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)


def build_sdxl(folder: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        use_linear_projection=True)
    return StableDiffusionXLPipeline(
        vae=_vae(1024, 0.13025), unet=unet,
        text_encoder=_clip_text(768, 12, 12, 3072, 768, "quick_gelu", with_projection=False),
        text_encoder_2=_clip_text(1280, 32, 20, 5120, 1280, "gelu", with_projection=True),
        tokenizer=clip_bpe_tokenizer(folder / "_tokenizer"), tokenizer_2=clip_bpe_tokenizer(folder / "_tokenizer_2", pad_token="!"),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1),
        force_zeros_for_empty_prompt=True)


def build_pixart(folder: Path):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from fixtures import t5_tokenizer

    tokenizer = t5_tokenizer()
    tokenizer.model_max_length = 120
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id))
    transformer = PixArtTransformer2DModel(
        sample_size=64, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16, in_channels=4,
        out_channels=8, caption_channels=4096, cross_attention_dim=1152, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae(512, 0.18215),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "pixart": build_pixart}


def save_realsize(kind: str, folder: Path) -> Path:
    """Build ``kind`` with random weights (seeded), save it in its distribution dtype, and free it."""
    import gc

    import torch

    torch.manual_seed(0)
    folder = Path(folder)
    dtype = getattr(torch, SAVE_DTYPES[kind])
    previous = torch.get_default_dtype()
    # SDXL is built in its saved dtype: a float32 copy beside the bfloat16 one would not fit in 24 GB.
    torch.set_default_dtype(dtype if kind == "sdxl" else torch.float32)
    try:
        pipe = BUILDERS[kind](folder.parent / f".{folder.name}-build")
    finally:
        torch.set_default_dtype(previous)
    pipe.to(dtype)
    pipe.save_pretrained(folder)
    del pipe
    gc.collect()
    return folder
