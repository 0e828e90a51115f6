"""Attack-hardened PURE: the rounds attack the edit, fold the found contexts into the forget rows and
re-solve from the original weights; every round is recorded."""
import pytest
import torch
from pydantic import ValidationError

from safeguard.attention import (
    capture_activations,
    capture_embedding_activations,
    capture_prompt_activations,
    cross_attention_modules,
    denoiser_of,
)
from safeguard.builtin.hardening import HardenParams, banned_words, removed_share
from safeguard.builtin.pure import PureEraser, PureParams, erasure_operator
from safeguard.encoding import encode_prompts
from safeguard.erasers import ConceptRequest, EraseRequest

FORGET = ["pikachu in a garden", "pikachu on the beach", "pikachu in the city", "pikachu at night"]
RETAIN = ["a photo of mario", "a picture of snoopy", "a photo of stitch"]
HARDEN = {"rounds": 2, "budget": 2, "targets": 2, "render_steps": 2, "restarts": 1, "stop_ratio": None}
CAPTURE = {"steps": 2, "seeds": 1}


def _request():
    return EraseRequest(concepts=[ConceptRequest("Pikachu", "character", FORGET, RETAIN)], keep_prompts=[], seed=0)


def test_embedding_capture_equals_prompt_capture_for_the_prompts_own_embeddings(tiny_pipe):
    pipe = tiny_pipe("sd1")
    settings = dict(steps=2, seeds=[0, 1], guidance_scale=5.0, batch_size=2)
    from_prompts = capture_prompt_activations(pipe, FORGET[:3], **settings)
    encoded = encode_prompts(pipe, FORGET[:3], with_negative=True)
    from_embeddings = capture_embedding_activations(pipe, encoded.embeds, negative_prompt_embeds=encoded.negative[:1],
                                                    **settings)
    assert from_prompts.keys() == from_embeddings.keys()
    for layer in from_prompts:
        torch.testing.assert_close(from_embeddings[layer], from_prompts[layer], rtol=1e-5, atol=1e-6)


def test_embedding_capture_needs_a_negative_under_guidance(tiny_pipe):
    pipe = tiny_pipe("sd1")
    embeds = encode_prompts(pipe, FORGET[:1]).embeds
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        capture_embedding_activations(pipe, embeds, negative_prompt_embeds=None, steps=1, seeds=[0], guidance_scale=5.0)


def test_harden_params_are_validated():
    assert HardenParams().attacks == ["soft_prompt", "unlearn_diff_atk"]
    for bad in ({"rounds": 0}, {"attacks": []}, {"attacks": ["rece"]}, {"budget": 0}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            HardenParams(**bad)
    assert PureParams(harden={"rounds": 3}).harden.rounds == 3


def test_banned_words_are_the_concepts_own_name():
    assert banned_words("Sonic the Hedgehog") == ["hedgehog", "sonic"]


def test_removed_share_measures_what_the_operator_takes_away():
    V = torch.eye(4, dtype=torch.float64)[:, :1]
    E = erasure_operator(V)  # removes the first axis
    rows = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    assert removed_share(rows, E) == pytest.approx(9 / 25)


def test_hardened_edit_adds_attack_rows_and_is_solved_from_the_original_weights(tiny_pipe):
    pipe = tiny_pipe("sd1")
    denoiser = denoiser_of(pipe)
    layers = cross_attention_modules(denoiser)
    original = {name: t.clone() for name, t in denoiser.state_dict().items()}

    plain = PureEraser().erase(pipe, _request(), {**CAPTURE, "tau": 0.99})
    denoiser.load_state_dict(original)
    result = PureEraser().erase(pipe, _request(), {**CAPTURE, "tau": 0.99, "harden": HARDEN})

    record = result.stats["harden"]
    assert plain.stats["harden"] is None
    assert [r["round"] for r in record["rounds"]] == [1, 2]
    for round_record in record["rounds"]:
        found = round_record["attacks"]["Pikachu"]
        assert {entry["attack"] for entry in found} == {"soft_prompt", "unlearn_diff_atk"}
        assert all(entry["loss"] > 0 and entry["loss_ratio"] > 0 for entry in found)
        # one soft-prompt context and one UnlearnDiffAtk prompt, each captured with 1 seed x 2 steps
        assert round_record["rows_added_per_layer"] == 2 * 2
        assert set(round_record["removed_by_this_edit"]) == set(layers)
        # the re-solved edit removes at least as much of the new rows as the one before
        for layer in layers:
            assert round_record["removed_by_this_edit"][layer] >= round_record["removed_by_previous_edit"][layer] - 1e-9
    assert record["reference_loss"]["Pikachu"] > 0
    hardened_rows = result.layers[0].stats["rows_forget"]
    assert hardened_rows == plain.layers[0].stats["rows_forget"] + 2 * 4

    # the originals are the unedited weights, and the edit is the final operator applied to them
    for name, tensor in result.originals.items():
        assert torch.equal(tensor, original[name])
    for path, attn in layers.items():
        E = erasure_operator(result.artefacts["forget_bases"][path], result.artefacts["retain_bases"][path])
        torch.testing.assert_close(attn.to_v.weight, E.float() @ original[f"{path}.to_v.weight"], rtol=1e-5, atol=1e-6)
    # nothing but K and V changed
    state = denoiser.state_dict()
    assert all(torch.equal(state[name], t) for name, t in original.items() if name not in result.originals)


def test_hardening_stops_when_the_attacks_fail(tiny_pipe):
    pipe = tiny_pipe("sd1")
    # Any loss is at least a tiny fraction of the reference: the first round's attacks count as failed.
    result = PureEraser().erase(pipe, _request(), {**CAPTURE, "harden": {**HARDEN, "stop_ratio": 1e-9,
                                                                          "attacks": ["soft_prompt"]}})
    rounds = result.stats["harden"]["rounds"]
    assert len(rounds) == 1 and rounds[0]["stopped"]
    assert result.layers[0].stats["rows_forget"] == len(FORGET) * 2
