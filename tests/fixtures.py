"""Tiny diffusers pipelines built offline from configs, for tests that need a real pipeline.

Every kind is built once per process with random weights (fixed seed), saved with ``save_pretrained`` and
loaded back with ``DiffusionPipeline.from_pretrained``, so the loading path is the one real models take.
``tiny_pipeline(kind)`` returns a fresh copy each call: erasers edit weights in place, and one test's edit
must not leak into another's.

Kinds:
    "sd1"       StableDiffusionPipeline: UNet2DConditionModel + CLIPTextModel + CLIPTokenizer (DDIM)
    "sd1-bert"  the same UNet with BertModel + BertTokenizer, the text stack of the embedded model
    "sdxl"      StableDiffusionXLPipeline: two CLIP encoders (the second with projection), text-time ids
    "pixart"    PixArtAlphaPipeline: PixArtTransformer2DModel + T5EncoderModel + T5Tokenizer

The tokenizers are built from a small vocabulary written here (no hub files): CLIP byte-level BPE whose
merges spell every vocabulary word as one token, a WordPiece vocab for BERT, and a Unigram vocab for T5.
"""
from __future__ import annotations

import tempfile
import threading
from pathlib import Path

KINDS = ("sd1", "sd1-bert", "sdxl", "pixart")

# Words the tests use in prompts; every one is a single token in all three tokenizers.
WORDS = (
    "a an the of by in on with and photo picture image painting portrait drawing artwork style art "
    "sketch render close up view garden beach city forest night sunny red blue green small big cute "
    "pikachu mario snoopy stitch sonic luigi homer mickey monet picasso renoir warhol kahlo dali "
    "cat dog tree house car bird flower mountain river boat chair apple table lamp cloud"
).split()

TEXT_LENGTH = 16  # tokenizer.model_max_length for the CLIP and BERT tokenizers
TEXT_WIDTH = 32

_lock = threading.Lock()
_built: dict[str, Path] = {}
_default_root: Path | None = None


# --------------------------------------------------------------------------------------------- tokenizers
def clip_tokenizer(model_max_length: int = TEXT_LENGTH):
    """A CLIPTokenizer whose byte-level BPE merges spell each of WORDS as a single ``word</w>`` token."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    # Learn the merges with CLIP's own normaliser and pre-tokeniser; encoding replays the learned merges,
    # so every training word comes out whole.
    template = CLIPTokenizer().backend_tokenizer
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    bpe.normalizer = template.normalizer
    bpe.pre_tokenizer = template.pre_tokenizer
    # Single characters as words too, so a word outside WORDS spells out instead of hitting <unk>.
    corpus = [*WORDS, *"abcdefghijklmnopqrstuvwxyz0123456789", *".,'!?-"]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text stays encodable
    ))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # The trainer's ids and merge order vary between processes; renumber both in a fixed order (merges by
    # the length of what they build, so every merge's parts exist before it) to make ids reproducible.
    specials = ("<|startoftext|>", "<|endoftext|>")
    order = sorted(model["vocab"], key=lambda t: (t not in specials, specials.index(t) if t in specials else 0, len(t), t))
    vocab = {token: i for i, token in enumerate(order)}
    merges = sorted(merges, key=lambda m: (len(m[0] + m[1]), m[0], m[1]))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    _check_single_tokens(tokenizer)
    return tokenizer


def bert_tokenizer(model_max_length: int = TEXT_LENGTH):
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += [c for c in letters if c not in tokens] + ["##" + c for c in letters]
    tokens += list(".,'!?-")
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=model_max_length)
    _check_single_tokens(tokenizer)
    return tokenizer


def t5_tokenizer():
    """A Unigram T5Tokenizer: whole words score far above spelling them out letter by letter."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + word, -2.0) for word in WORDS]
    pieces += [(chr(c), -6.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [(chr(c), -6.0) for c in range(ord("A"), ord("Z") + 1)]
    pieces += [(c, -6.0) for c in ".,'!?-"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    _check_single_tokens(tokenizer)
    return tokenizer


def _check_single_tokens(tokenizer) -> None:
    for word in WORDS:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise AssertionError(f"{type(tokenizer).__name__} splits {word!r} into {ids}")


# ----------------------------------------------------------------------------------------------- models
def _clip_text_config(tokenizer, projection_dim: int = TEXT_WIDTH):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )


def _tiny_vae(num_blocks: int = 2):
    from diffusers import AutoencoderKL

    # vae_scale_factor = 2 ** (num_blocks - 1); the VAE never runs (captures return latents).
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * num_blocks,
        down_block_types=("DownEncoderBlock2D",) * num_blocks, up_block_types=("UpDecoderBlock2D",) * num_blocks,
        layers_per_block=1, norm_num_groups=4, sample_size=32,
    )


def _tiny_sd_unet(cross_attention_dim: int = TEXT_WIDTH, **extra):
    from diffusers import UNet2DConditionModel

    # Four cross-attention layers of two widths (32 and 64): down, mid and two up.
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8, **extra,
    )


def _build_sd1(text: str):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    if text == "clip":
        from transformers import CLIPTextModel

        tokenizer = clip_tokenizer()
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    else:
        from transformers import BertConfig, BertModel

        tokenizer = bert_tokenizer()
        text_encoder = BertModel(BertConfig(
            vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=TEXT_LENGTH, pad_token_id=tokenizer.pad_token_id,
        ))
    return StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=_tiny_sd_unet(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def _build_sdxl():
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    time_embed_dim = 8
    unet = _tiny_sd_unet(
        cross_attention_dim=2 * TEXT_WIDTH,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_WIDTH,  # six time ids + pooled text
        use_linear_projection=True,
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_clip_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tokenizer_2)),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1),
        force_zeros_for_empty_prompt=True,
    )


def _build_pixart():
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=TEXT_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))
    # sample_size 32 is PixArt's 256-px resolution bin, so the pipeline's default resolution binning works;
    # an 8x VAE factor keeps the latent at 32x32 and patch 4 makes it 64 tokens.
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=2, patch_size=4, attention_head_dim=8, num_attention_heads=4,
        in_channels=4, out_channels=8, caption_channels=TEXT_WIDTH, cross_attention_dim=32,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_vae(num_blocks=4), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


_BUILDERS = {
    "sd1": lambda: _build_sd1("clip"),
    "sd1-bert": lambda: _build_sd1("bert"),
    "sdxl": _build_sdxl,
    "pixart": _build_pixart,
}


# ------------------------------------------------------------------------------------------------ public
def tiny_pipeline_dir(kind: str, root: str | Path | None = None) -> Path:
    """The saved folder of a tiny pipeline, built on first use (once per process)."""
    global _default_root
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; choose one of {', '.join(KINDS)}")
    with _lock:
        if kind not in _built:
            if root is None:
                if _default_root is None:
                    _default_root = Path(tempfile.mkdtemp(prefix="safeguard-tiny-"))
                root = _default_root
            folder = Path(root) / kind
            _BUILDERS[kind]().save_pretrained(folder)
            _built[kind] = folder
        return _built[kind]


def tiny_pipeline(kind: str, root: str | Path | None = None):
    """A freshly loaded tiny pipeline of ``kind`` (float32, CPU, progress bars off)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir(kind, root))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# A one-concept policy for the tiny pipelines copied to ./model; the CLI and crash-safety tests share it.
_TINY_POLICY = """\
version: 1
name: {name}
model:
  source: model
eraser:
  name: {eraser}
  params: {params}
concepts:
  - name: pikachu
    category: character
    forget_anchors: [a photo of pikachu, pikachu in a garden]
    neighbours: [mario]
    paraphrases: [the yellow electric mouse]
probes:
  kinds: [canonical, paraphrase]
  images_per_prompt: 1
  steps: 2
  max_prompts: 2
thresholds:
  max_leakage: 0.8
  min_elicitation: 0.0  # stand-in judges cannot tell the two models apart: plumbing tests skip the power rule
judge:
  name: {judge}
  checkpoint: none
gate:
  required: {required}
output:
  dir: {out}
"""


def tiny_policy_text(name: str, *, eraser: str = "pure", params: str = "{steps: 2, seeds: 1}",
                     judge: str = "never-target", out: str = "edited", required: str = "[]") -> str:
    return _TINY_POLICY.format(name=name, eraser=eraser, params=params, judge=judge, out=out, required=required)
