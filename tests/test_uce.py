"""UCE: token selection, the closed form against a direct numpy solve, and plugin registration."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from safeguard.attention import cross_attention_modules, denoiser_of
from safeguard.builtin.uce import UceEraser, UceParams, last_content_position, subject_position
from safeguard.erasers import ConceptRequest, EraseRequest

FORGET = ["a photo of pikachu", "a painting of pikachu", "an image of pikachu"]
RETAIN = ["a photo of mario", "a picture of snoopy"]
KEEP = ["a cat"]


def _request(category="character", forget=FORGET):
    return EraseRequest(concepts=[ConceptRequest("pikachu", category, list(forget), RETAIN)], keep_prompts=KEEP)


# ------------------------------------------------------------------------------------------ tokens
def _tokenizers():
    from fixtures import bert_tokenizer, clip_tokenizer, t5_tokenizer

    return {"clip": clip_tokenizer(), "bert": bert_tokenizer(), "t5": t5_tokenizer()}


@pytest.mark.parametrize("family", ["clip", "bert", "t5"])
def test_subject_position_is_the_concept_token_wherever_it_stands(family):
    tokenizer = _tokenizers()[family]
    for prompt in ("pikachu in a garden", "a photo of pikachu", "a cute pikachu on the beach"):
        position = subject_position(tokenizer, prompt, "pikachu", 64)
        ids = tokenizer(prompt)["input_ids"]
        assert tokenizer.convert_ids_to_tokens(ids[position]).strip("▁").removesuffix("</w>") == "pikachu"
    # Two-word names: the last token of the last occurrence.
    prompt = "monet and dali, by monet dali"
    ids = tokenizer(prompt)["input_ids"]
    assert subject_position(tokenizer, prompt, "monet dali", 64) == len(ids) - 2  # just before the end token
    assert subject_position(tokenizer, "a photo of mario", "pikachu", 64) is None


@pytest.mark.parametrize("family", ["clip", "bert", "t5"])
def test_last_content_position_skips_special_tokens(family):
    tokenizer = _tokenizers()[family]
    ids = tokenizer("a photo of mario")["input_ids"]
    position = last_content_position(tokenizer, "a photo of mario", 64)
    assert ids[position] not in tokenizer.all_special_ids
    assert tokenizer.convert_ids_to_tokens(ids[position]).strip("▁").removesuffix("</w>") == "mario"
    assert last_content_position(tokenizer, "", 64) == 0  # no content: the sequence's first token


# ------------------------------------------------------------------------------------------ closed form
def _encoded(pipe, prompts):
    """Cross-attention context and token masks, computed the plain way for the tiny pipelines."""
    embeds = pipe.encode_prompt(prompt=prompts, device="cpu", num_images_per_prompt=1,
                                do_classifier_free_guidance=False)[0]
    if hasattr(pipe, "transformer"):  # PixArt projects the T5 states before cross-attention
        embeds = pipe.transformer.caption_projection(embeds)
    length = embeds.shape[1]
    mask = pipe.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                          return_tensors="pt")["attention_mask"]
    return embeds.detach().double().numpy(), mask.numpy()


def _numpy_uce(W0, erase, guide, preserve, lam, s_e, s_p):
    d_out, d_in = W0.shape
    lhs = lam * W0.copy()
    gram = lam * np.eye(d_in)
    for k, g in zip(erase, guide):
        v_star = W0 @ g
        lhs += s_e * np.outer(v_star, k)
        gram += s_e * np.outer(k, k)
    for k in preserve:
        lhs += s_p * np.outer(W0 @ k, k)
        gram += s_p * np.outer(k, k)
    # W* gram = lhs  <=>  gramᵀ W*ᵀ = lhsᵀ
    return np.linalg.solve(gram.T, lhs.T).T


@pytest.mark.parametrize("kind", ["sd1", "sd1-bert", "sdxl", "pixart"])
def test_uce_matches_a_direct_numpy_solve(tiny_pipe, kind):
    pipe = tiny_pipe(kind)
    params = UceParams(guide="cat", lam=0.5, erase_scale=1.0, preserve_scale=0.7)
    layers = cross_attention_modules(denoiser_of(pipe))
    originals = {path: (attn.to_k.weight.detach().double().numpy().copy(), attn.to_v.weight.detach().double().numpy().copy())
                 for path, attn in layers.items()}

    # Keys as the reference implementation takes them: the token before the end token, mask.sum() - 2
    # (every prompt here ends with its subject).
    prompts = [*FORGET, "cat", *KEEP, *RETAIN]
    context, mask = _encoded(pipe, prompts)
    last = mask.sum(axis=1) - 2
    keys = {p: context[i, last[i]] for i, p in enumerate(prompts)}
    erase = [keys[p] for p in FORGET]
    guide = [keys["cat"]] * len(FORGET)
    preserve = [keys[p] for p in [*KEEP, *RETAIN]]

    result = UceEraser.erase(pipe, _request(), params)
    assert result.stats["subject_fallbacks"] == []
    for path, attn in layers.items():
        for index, proj in enumerate(("to_k", "to_v")):
            expected = _numpy_uce(originals[path][index], erase, guide, preserve, 0.5, 1.0, 0.7)
            edited = getattr(attn, proj).weight.detach().double().numpy()
            np.testing.assert_allclose(edited, expected, rtol=1e-5, atol=1e-6)


def test_uce_empty_guide_maps_to_the_start_token_and_style_uses_art(tiny_pipe):
    pipe = tiny_pipe("sd1")
    layers = cross_attention_modules(denoiser_of(pipe))
    path, attn = next(iter(layers.items()))
    W0 = attn.to_v.weight.detach().double().numpy().copy()
    context, mask = _encoded(pipe, [*FORGET, "", *KEEP, *RETAIN])
    last = mask.sum(axis=1) - 2
    assert last[len(FORGET)] == 0  # "" -> [BOS, EOS]: the reference code's guide is the start token
    keys = [context[i, last[i]] for i in range(len(last))]
    expected = _numpy_uce(W0, keys[:3], [keys[3]] * 3, keys[4:], 0.5, 1.0, 1.0)

    result = UceEraser.erase(pipe, _request(), None)
    assert result.stats["guides"] == {"pikachu": ""}
    np.testing.assert_allclose(attn.to_v.weight.detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)

    style = UceEraser.erase(tiny_pipe("sd1"), _request(category="style"), {})
    assert style.stats["guides"] == {"pikachu": "art"}
    explicit = UceEraser.erase(tiny_pipe("sd1"), _request(category="style"), {"guide": "a tree"})
    assert explicit.stats["guides"] == {"pikachu": "a tree"}


def test_uce_result_records_what_it_changed(tiny_pipe):
    pipe = tiny_pipe("pixart")
    denoiser = denoiser_of(pipe)
    layers = cross_attention_modules(denoiser)
    before = {name: tensor.clone() for name, tensor in denoiser.state_dict().items()}
    result = UceEraser.erase(pipe, _request(forget=[*FORGET, "Pikachu at night"]))

    assert result.stats["subject_fallbacks"] == ["Pikachu at night"]  # T5 is case-sensitive
    assert result.stats["erase_keys"] == 4 and result.stats["preserve_keys"] == 3
    expected_names = {f"{path}.{proj}.weight" for path in layers for proj in ("to_k", "to_v")}
    assert set(result.originals) == expected_names  # biases are not part of the fit
    after = denoiser.state_dict()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor) != (name in expected_names), name
        if name in expected_names:
            assert torch.equal(result.originals[name], tensor)
    for edit in result.layers:
        assert edit.stats["erase_keys"] == 4 and edit.stats["preserve_keys"] == 3
        assert edit.stats["delta_norm_k"] > 0 and edit.stats["relative_delta_norm_v"] > 0
    for key in ("seconds", "encode_seconds", "solve_seconds"):
        assert result.stats[key] >= 0


def test_uce_params_are_validated():
    assert UceParams().lam == 0.5 and UceParams().guide is None and UceParams().token == "last_subject"
    for bad in ({"lam": -1}, {"token": "all"}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            UceParams(**bad)


# ------------------------------------------------------------------------------------------ registration
def test_builtin_erasers_are_registered():
    from safeguard.builtin.pure import PureEraser
    from safeguard.plugins import get_erasers

    erasers = get_erasers()
    assert erasers["pure"] is PureEraser and erasers["uce"] is UceEraser
    for cls in (PureEraser, UceEraser):
        assert cls.kind == "weights" and cls.version


def test_eraser_modules_import_without_torch():
    code = ("import sys, safeguard.builtin.pure, safeguard.builtin.uce; "
            "loaded = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
