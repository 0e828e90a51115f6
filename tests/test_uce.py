"""UCE: the reference's token selection, the closed form against a direct numpy solve, and registration."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from safeguard.attention import cross_attention_modules, denoiser_of
from safeguard.builtin.uce import UceEraser, UceParams, erase_positions, last_content_position
from safeguard.erasers import ConceptRequest, EraseRequest

FORGET = ["a photo of pikachu", "a painting of pikachu", "an image of pikachu in a garden"]
RETAIN = ["a photo of mario", "a picture of snoopy"]
KEEP = ["a cat"]


def _request(category="character", forget=FORGET, retain=RETAIN, keep=KEEP):
    return EraseRequest(concepts=[ConceptRequest("pikachu", category, list(forget), list(retain))],
                        keep_prompts=list(keep))


# ------------------------------------------------------------------------------------------ tokens
def _tokenizers():
    from fixtures import bert_tokenizer, clip_tokenizer, t5_tokenizer

    return {"clip": clip_tokenizer(), "bert": bert_tokenizer(), "t5": t5_tokenizer()}


def _reference_last(tokenizer, texts, length):
    """The reference's index of the last content token: attention_mask.sum() - 2 on the padded batch.

    T5 adds no start token, so its empty text has a mask sum of 1; the eraser then takes position 0.
    """
    mask = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True,
                     return_tensors="np")["attention_mask"]
    return [max(int(m.sum()) - 2, 0) for m in mask]


def _reference_slices(tokenizer, prompt, guide, length):
    """The reference's slices: [i_p, L - max(0, far - i_p)) of the prompt, [i_g, L - max(0, far - i_g)) of the guide."""
    i_p, i_g = _reference_last(tokenizer, [prompt, guide], length)
    far = max(i_p, i_g)
    return list(range(i_p, length - max(0, far - i_p))), list(range(i_g, length - max(0, far - i_g)))


TEXTS = ["pikachu", "a photo of pikachu", "monet dali", "an image of pikachu in a garden", " ", "", "art",
         "a big red car with a small blue bird on the tree"]


@pytest.mark.parametrize("family", ["clip", "bert", "t5"])
def test_last_content_position_is_the_references_index(family):
    tokenizer = _tokenizers()[family]
    length = 12
    expected = _reference_last(tokenizer, TEXTS, length)
    assert [last_content_position(tokenizer, text, length) for text in TEXTS] == expected
    # The position holds the text's last word (or the start, for a text with no content).
    ids = tokenizer("a photo of mario")["input_ids"]
    word = tokenizer.convert_ids_to_tokens(ids[last_content_position(tokenizer, "a photo of mario", length)])
    assert word.strip("▁").removesuffix("</w>") == "mario"
    assert last_content_position(tokenizer, " ", length) == 0


@pytest.mark.parametrize("family", ["clip", "bert", "t5"])
def test_erase_positions_are_the_references_slices(family):
    tokenizer = _tokenizers()[family]
    length = 12
    for prompt in TEXTS[:4] + TEXTS[-1:]:
        for guide in (" ", "art", "a photo of a cat", "a big red car with a small blue bird on the tree"):
            got = erase_positions(tokenizer, prompt, guide, length)
            expected = _reference_slices(tokenizer, prompt, guide, length)
            assert got == expected, (prompt, guide)
            assert len(got[0]) == len(got[1]) >= 1 and got[0][-1] < length and got[1][-1] < length
    # The common case: from the name's last token through EOS and padding to the end of the sequence.
    positions, guide_positions = erase_positions(tokenizer, "a photo of pikachu", " ", length)
    assert positions[-1] == length - 1 and guide_positions[0] == 0


# ------------------------------------------------------------------------------------------ closed form
def _encoded(pipe, prompts):
    """Cross-attention context, computed the plain way for the tiny pipelines."""
    embeds = pipe.encode_prompt(prompt=prompts, device="cpu", num_images_per_prompt=1,
                                do_classifier_free_guidance=False)[0]
    if hasattr(pipe, "transformer"):  # PixArt projects the T5 states before cross-attention
        embeds = pipe.transformer.caption_projection(embeds)
    return embeds.detach().double().numpy()


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


def _expected_keys(pipe, erase_prompts, guide, preserve_prompts):
    """Erase, guide and preserve keys by the reference's rule, from states encoded here."""
    prompts = [*erase_prompts, guide, *preserve_prompts]
    context = _encoded(pipe, prompts)
    length = context.shape[1]
    erase, targets = [], []
    for i, prompt in enumerate(erase_prompts):
        prompt_slice, guide_slice = _reference_slices(pipe.tokenizer, prompt, guide, length)
        erase += [context[i, j] for j in prompt_slice]
        targets += [context[len(erase_prompts), j] for j in guide_slice]
    preserve = [context[len(erase_prompts) + 1 + i, j] for i in range(len(preserve_prompts)) for j in range(length)]
    return erase, targets, preserve


def _originals(pipe):
    layers = cross_attention_modules(denoiser_of(pipe))
    return layers, {path: {proj: getattr(attn, proj).weight.detach().double().numpy().copy() for proj in ("to_k", "to_v")}
                    for path, attn in layers.items()}


@pytest.mark.parametrize("kind", ["sd1", "sd1-bert", "sdxl", "pixart"])
@pytest.mark.parametrize("erase_prompts", ["anchors", "names"])
def test_uce_matches_a_direct_numpy_solve(tiny_pipe, kind, erase_prompts):
    pipe = tiny_pipe(kind)
    params = UceParams(guide="a photo of a cat", lam=0.5, erase_scale=1.0, preserve_scale=0.7, erase_prompts=erase_prompts)
    layers, originals = _originals(pipe)
    erased = FORGET if erase_prompts == "anchors" else ["pikachu"]
    erase, targets, preserve = _expected_keys(pipe, erased, "a photo of a cat", [*KEEP, *RETAIN])

    result = UceEraser().erase(pipe, _request(), params)
    assert result.stats["erase_keys"] == len(erase) and result.stats["preserve_keys"] == len(preserve)
    assert result.stats["erase_prompts"] == {"pikachu": erased}
    for path, attn in layers.items():
        for proj in ("to_k", "to_v"):
            expected = _numpy_uce(originals[path][proj], erase, targets, preserve, 0.5, 1.0, 0.7)
            edited = getattr(attn, proj).weight.detach().double().numpy()
            np.testing.assert_allclose(edited, expected, rtol=1e-5, atol=1e-6)


def test_uce_defaults_are_the_references(tiny_pipe):
    params = UceParams()
    assert (params.lam, params.erase_scale, params.preserve_scale) == (0.5, 1.0, 0.1)
    assert params.technique == "replace" and params.erase_prompts == "names" and params.guide is None

    # The bare name towards " " (its slice starts at the start token), preserve scale 0.1.
    pipe = tiny_pipe("sd1")
    layers, originals = _originals(pipe)
    erase, targets, preserve = _expected_keys(pipe, ["pikachu"], " ", [*KEEP, *RETAIN])
    result = UceEraser().erase(pipe, _request(), None)
    assert result.stats["guides"] == {"pikachu": " "} and result.stats["erase_prompts"] == {"pikachu": ["pikachu"]}
    for path, attn in layers.items():
        expected = _numpy_uce(originals[path]["to_v"], erase, targets, preserve, 0.5, 1.0, 0.1)
        np.testing.assert_allclose(attn.to_v.weight.detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_uce_guides_by_category(tiny_pipe):
    style = UceEraser().erase(tiny_pipe("sd1"), _request(category="style"), {})
    assert style.stats["guides"] == {"pikachu": "art"}
    explicit = UceEraser().erase(tiny_pipe("sd1"), _request(category="style"), {"guide": "a tree"})
    assert explicit.stats["guides"] == {"pikachu": "a tree"}
    empty = UceEraser().erase(tiny_pipe("sd1"), _request(), {"guide": ""})
    assert empty.stats["guides"] == {"pikachu": " "}  # the reference turns an empty guide into " "


def test_uce_without_retain_prompts_preserves_the_empty_prompt(tiny_pipe):
    pipe = tiny_pipe("sd1-bert")
    layers, originals = _originals(pipe)
    erase, targets, preserve = _expected_keys(pipe, ["pikachu"], " ", [""])
    result = UceEraser().erase(pipe, _request(retain=[], keep=[]), {})
    assert result.stats["preserved_empty_prompt"] is True and result.stats["preserve_prompts"] == 1
    for path, attn in layers.items():
        expected = _numpy_uce(originals[path]["to_k"], erase, targets, preserve, 0.5, 1.0, 0.1)
        np.testing.assert_allclose(attn.to_k.weight.detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_uce_result_records_what_it_changed(tiny_pipe):
    pipe = tiny_pipe("pixart")
    denoiser = denoiser_of(pipe)
    layers = cross_attention_modules(denoiser)
    before = {name: tensor.clone() for name, tensor in denoiser.state_dict().items()}
    result = UceEraser().erase(pipe, _request(forget=[*FORGET, "Pikachu at night"]), {"erase_prompts": "anchors"})

    length = result.stats["sequence_length"]
    assert result.stats["preserve_keys"] == 3 * length  # every position of the three retain prompts
    assert result.stats["erase_keys"] == sum(len(erase_positions(pipe.tokenizer, p, " ", length)[0])
                                             for p in [*FORGET, "Pikachu at night"])
    expected_names = {f"{path}.{proj}.weight" for path in layers for proj in ("to_k", "to_v")}
    assert set(result.originals) == expected_names  # biases are not part of the fit
    after = denoiser.state_dict()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor) != (name in expected_names), name
        if name in expected_names:
            assert torch.equal(result.originals[name], tensor)
    for edit in result.layers:
        assert edit.stats["erase_keys"] == result.stats["erase_keys"]
        assert edit.stats["preserve_keys"] == 3 * length
        assert edit.stats["delta_norm_k"] > 0 and edit.stats["relative_delta_norm_v"] > 0
    for key in ("seconds", "encode_seconds", "solve_seconds"):
        assert result.stats[key] >= 0
    assert result.artefacts == {}  # UCE has no bases to save


def test_uce_rejects_a_prompt_both_erased_and_retained(tiny_pipe):
    with pytest.raises(ValueError, match="both forgotten and retained"):
        UceEraser().erase(tiny_pipe("sd1"), _request(keep=["pikachu"]))


def test_uce_params_are_validated():
    for bad in ({"lam": -1}, {"technique": "tensor"}, {"erase_prompts": "all"}, {"token": "last_subject"},
                {"unknown": 1}):
        with pytest.raises(ValidationError):
            UceParams(**bad)


def test_apply_with_uce_saves_no_bases(tmp_path, tiny_pipeline_root, monkeypatch):
    import shutil

    from fixtures import tiny_pipeline_dir, tiny_policy_text

    from safeguard.engine import apply_policy
    from safeguard.modelio import EDIT_BASES, EDIT_RECORD, read_edit_bases
    from safeguard.policy import load_policy

    shutil.copytree(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEGUARD_DB", f"sqlite:///{tmp_path}/audit.db")
    (tmp_path / "policy.yaml").write_text(tiny_policy_text("tiny-uce", eraser="uce", params="{}"))
    apply_policy(load_policy(tmp_path / "policy.yaml"), echo=lambda m: None)
    out = tmp_path / "edited"
    assert (out / EDIT_RECORD).exists() and not (out / EDIT_BASES).exists()
    assert read_edit_bases(out) is None


# ------------------------------------------------------------------------------------------ registration
def test_builtin_erasers_are_registered():
    from safeguard.builtin.pure import PureEraser
    from safeguard.contracts import contract_gaps
    from safeguard.plugins import get_erasers

    erasers = get_erasers()
    assert erasers["pure"] is PureEraser and erasers["uce"] is UceEraser
    for cls in (PureEraser, UceEraser):
        assert contract_gaps("eraser", cls) == [] and cls.version


def test_eraser_modules_import_without_torch():
    code = ("import sys, safeguard.builtin.pure, safeguard.builtin.uce; "
            "loaded = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
