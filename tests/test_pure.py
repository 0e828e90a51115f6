"""PURE: the subspace and operator algebra, and the edit on tiny pipelines."""
import math

import pytest
import torch
from pydantic import ValidationError

from safeguard.attention import capture_activations, cross_attention_modules, denoiser_of
from safeguard.builtin.pure import (
    PureEraser,
    PureParams,
    apply_operator,
    erased_basis,
    erasure_operator,
    explained_variance,
    forget_only_basis,
    subspace_basis,
)
from safeguard.erasers import ConceptRequest, EraseRequest


def _orthonormal(d, k, generator):
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))
    return q


def _projector(V):
    return V @ V.T


# ------------------------------------------------------------------------------------------ subspaces
def test_subspace_basis_keeps_the_fewest_directions_reaching_tau():
    g = torch.Generator().manual_seed(0)
    U, V = _orthonormal(40, 4, g), _orthonormal(10, 4, g)
    singular_values = torch.tensor([10.0, 5.0, 1.0, 0.1], dtype=torch.float64)
    H = U @ torch.diag(singular_values) @ V.T
    cumulative = torch.cumsum(singular_values**2, 0) / (singular_values**2).sum()  # .794 .992 .99992 1

    for tau, k in [(0.5, 1), (0.99, 2), (0.999, 3), (0.9999, 3), (1.0, 4)]:
        basis = subspace_basis(H, tau)
        assert basis.shape == (10, k)
        torch.testing.assert_close(basis.T @ basis, torch.eye(k, dtype=torch.float64))
        torch.testing.assert_close(_projector(basis), _projector(V[:, :k]))
        kept = explained_variance(H, basis)
        assert kept == pytest.approx(float(cumulative[k - 1]))
        assert kept >= tau - 1e-12

    assert subspace_basis(H, 1.0, max_rank=2).shape == (10, 2)


def test_subspace_basis_stops_at_the_numerical_rank():
    g = torch.Generator().manual_seed(1)
    H = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 12, generator=g, dtype=torch.float64)
    basis = subspace_basis(H, 1.0)
    assert basis.shape == (12, 3)
    assert explained_variance(H, basis) == pytest.approx(1.0)


def test_subspace_basis_centring_drops_the_shared_mean():
    g = torch.Generator().manual_seed(2)
    mean = torch.zeros(8, dtype=torch.float64)
    mean[0] = 10.0
    spread = torch.zeros(50, 8, dtype=torch.float64)
    spread[:, 1] = torch.randn(50, generator=g, dtype=torch.float64)
    H = mean + spread
    uncentred = subspace_basis(H, 0.9)
    centred = subspace_basis(H, 0.9, center=True)
    assert abs(float(uncentred[0, 0])) == pytest.approx(1.0, abs=1e-2)  # the mean direction dominates
    assert centred.shape[1] == 1 and abs(float(centred[1, 0])) == pytest.approx(1.0)


def test_subspace_basis_of_no_rows_is_empty():
    basis = subspace_basis(torch.zeros(0, 6), 0.99)
    assert basis.shape == (6, 0) and explained_variance(torch.zeros(0, 6), basis) == 0.0
    with pytest.raises(ValueError):
        subspace_basis(torch.ones(3, 6), 0.0)


# ------------------------------------------------------------------------------------------ operator
def _forget_and_retain(d=16, k_retain=4, k_forget_only=2, seed=0):
    """V_R; V_F spanning k_forget_only directions orthogonal to R plus one direction mixed with R."""
    g = torch.Generator().manual_seed(seed)
    Q = _orthonormal(d, k_retain + k_forget_only + 1, g)
    V_R = Q[:, :k_retain]
    forget_only = Q[:, k_retain:k_retain + k_forget_only]
    mixed = (Q[:, :1] + Q[:, -1:]) / math.sqrt(2)  # half in R, half outside everything
    V_F, _ = torch.linalg.qr(torch.cat([forget_only, mixed], dim=1))
    return V_F, V_R, forget_only, g


def test_erasure_operator_passes_retain_directions_through():
    V_F, V_R, _, g = _forget_and_retain()
    E = erasure_operator(V_F, V_R)
    r = V_R @ torch.randn(V_R.shape[1], 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(E @ r, r, rtol=0, atol=1e-12)


def test_erasure_operator_removes_forget_only_directions():
    V_F, V_R, forget_only, g = _forget_and_retain()
    E = erasure_operator(V_F, V_R)
    f = forget_only @ torch.randn(forget_only.shape[1], 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(E @ f, torch.zeros_like(f), rtol=0, atol=1e-12)
    # F ∩ R^⊥ is also E's left null space: no output of E has a component there, whatever the input.
    x = torch.randn(V_F.shape[0], 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(forget_only.T @ (E @ x), torch.zeros(forget_only.shape[1], 7, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_erasure_operator_only_shrinks_a_forget_direction_that_leans_on_retain():
    # A forget direction at angle θ to R is scaled by cos²θ, not removed: overlap with R limits erasure.
    d = 6
    e = torch.eye(d, dtype=torch.float64)
    for theta in (0.2, 0.7, 1.2):
        f = math.cos(theta) * e[:, :1] + math.sin(theta) * e[:, 1:2]
        E = erasure_operator(f, e[:, :1])
        torch.testing.assert_close(E @ f, math.cos(theta) ** 2 * f, rtol=0, atol=1e-12)


def test_erased_and_forget_only_bases():
    V_F, V_R, forget_only, _ = _forget_and_retain()
    erased = erased_basis(V_F, V_R)
    assert erased.shape[1] == forget_only.shape[1]
    torch.testing.assert_close(_projector(erased), _projector(forget_only), rtol=0, atol=1e-10)
    # Outside R, the forget basis has the forget-only directions plus the out-of-R half of the mixed one.
    outside = forget_only_basis(V_F, V_R)
    assert outside.shape[1] == forget_only.shape[1] + 1
    torch.testing.assert_close(V_R.T @ outside, torch.zeros(V_R.shape[1], outside.shape[1], dtype=torch.float64),
                               rtol=0, atol=1e-10)
    for without_retain in (None, torch.zeros(V_F.shape[0], 0, dtype=torch.float64)):
        torch.testing.assert_close(_projector(erased_basis(V_F, without_retain)), _projector(V_F))
        torch.testing.assert_close(_projector(forget_only_basis(V_F, without_retain)), _projector(V_F))


def test_erasure_operator_without_retain_is_the_orthogonal_complement():
    V_F, _, _, _ = _forget_and_retain()
    identity = torch.eye(V_F.shape[0], dtype=torch.float64)
    torch.testing.assert_close(erasure_operator(V_F, None), identity - _projector(V_F))
    torch.testing.assert_close(erasure_operator(V_F, torch.zeros(V_F.shape[0], 0, dtype=torch.float64)),
                               identity - _projector(V_F))


def test_apply_operator_left_multiplies_in_float32_and_keeps_dtype():
    g = torch.Generator().manual_seed(3)
    E = torch.randn(8, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(8, 5, generator=g).to(torch.float16)
    edited = apply_operator(E, weight)
    assert edited.dtype == torch.float16
    torch.testing.assert_close(edited, (E.float() @ weight.float()).half())


def test_params_are_validated():
    assert PureParams().tau == 0.999 and PureParams().center is False
    assert PureParams(tau=1.0).tau == 1.0
    for bad in ({"tau": 0}, {"tau": 1.5}, {"steps": 0}, {"seeds": 0}, {"max_rank": 0}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            PureParams(**bad)


# ------------------------------------------------------------------------------------------ the edit
CAPTURE = dict(steps=6, seeds=[0, 1], guidance_scale=5.0)  # the eraser's defaults with request.seed = 0
# Forget anchors carry the concept in contexts the retain anchors do not share, so F has directions that R
# does not span; retain anchors are the concept's neighbours.
FORGET = ["pikachu in a garden", "pikachu on the beach", "pikachu in the city",
          "pikachu in the forest", "pikachu at night", "pikachu with a cat"]
RETAIN = [template.format(name) for name in ("mario", "snoopy", "stitch")
          for template in ("a photo of {}", "a picture of {}")]


def _request(forget=FORGET, retain=RETAIN, keep=()):
    return EraseRequest(concepts=[ConceptRequest("pikachu", "character", list(forget), list(retain))],
                        keep_prompts=list(keep), seed=0)


def test_pure_edit_on_tiny_sd1_erases_forget_only_directions_and_keeps_retain(tiny_pipe):
    pipe = tiny_pipe("sd1")
    H_F_before = capture_activations(pipe, FORGET, **CAPTURE)
    H_R_before = capture_activations(pipe, RETAIN, **CAPTURE)

    result = PureEraser.erase(pipe, _request(), PureParams())

    H_F_after = capture_activations(pipe, FORGET, **CAPTURE)
    H_R_after = capture_activations(pipe, RETAIN, **CAPTURE)
    for edit in result.layers:
        layer = edit.module
        V_F = result.artefacts["forget_bases"][layer].double()
        V_R = result.artefacts["retain_bases"][layer].double()
        # E removes exactly span(F) ∩ span(R)^⊥; forget directions that lean on R are only shrunk (by cos²θ).
        T = erased_basis(V_F, V_R, tolerance=1e-5)  # the bases were stored in float32
        assert T.shape[1] >= 1, f"{layer}: the forget anchors span no direction outside the retain subspace"

        before, after = H_F_before[layer].double(), H_F_after[layer].double()
        energy_before = float((before @ T).square().sum())
        energy_after = float((after @ T).square().sum())
        assert energy_before >= 1e-3 * float(before.square().sum()), f"{layer}: vacuous forget-only subspace"
        assert energy_after <= 0.1 * energy_before, f"{layer}: {energy_after / energy_before:.3f} of the energy left"

        retain_before, retain_after = H_R_before[layer], H_R_after[layer]
        relative = float((retain_after - retain_before).norm() / retain_before.norm())
        assert relative < 0.01, f"{layer}: retain activations moved by {relative:.2%}"


def test_pure_result_records_what_it_changed(tiny_pipe):
    pipe = tiny_pipe("sd1")
    denoiser = denoiser_of(pipe)
    layers = cross_attention_modules(denoiser)
    state_before = {name: tensor.clone() for name, tensor in denoiser.state_dict().items()}

    result = PureEraser.erase(pipe, _request(keep=["a tree"]), {"steps": 2, "seeds": 1})

    assert [edit.module for edit in result.layers] == list(layers)
    expected_names = {f"{path}.{proj}.weight" for path in layers for proj in ("to_k", "to_v")}
    assert set(result.originals) == expected_names  # SD1 projections have no bias
    state_after = denoiser.state_dict()
    for name, tensor in state_before.items():
        if name in expected_names:
            assert torch.equal(result.originals[name], tensor)
            assert not torch.equal(state_after[name], tensor)
        else:
            assert torch.equal(state_after[name], tensor), f"{name} changed"

    for edit in result.layers:
        stats = edit.stats
        assert stats["rows_forget"] == len(FORGET) * 1 * 2
        assert stats["rows_retain"] == (len(RETAIN) + 1) * 1 * 2  # the keep prompt is retained too
        assert 1 <= stats["rank_forget"] <= stats["rows_forget"]
        assert 0 < stats["variance_kept_forget"] <= 1 and 0 < stats["variance_kept_retain"] <= 1
        for short in ("k", "v"):
            assert stats[f"delta_norm_{short}"] > 0 and 0 < stats[f"relative_delta_norm_{short}"] < 2
        assert stats["seconds"] >= 0
        width = layers[edit.module].inner_dim
        assert result.artefacts["forget_bases"][edit.module].shape == (width, stats["rank_forget"])
        assert result.artefacts["retain_bases"][edit.module].shape == (width, stats["rank_retain"])
        assert result.artefacts["forget_bases"][edit.module].dtype == torch.float32
    for key in ("seconds", "capture_seconds", "solve_seconds"):
        assert result.stats[key] >= 0
    assert result.stats["seconds"] >= result.stats["capture_seconds"]

    # Restoring the originals gives the model back bit for bit.
    denoiser.load_state_dict(result.originals, strict=False)
    assert all(torch.equal(denoiser.state_dict()[name], state_before[name]) for name in state_before)


@pytest.mark.parametrize("kind", ["sdxl", "pixart"])
def test_pure_edit_is_the_operator_applied_to_keys_values_and_biases(tiny_pipe, kind):
    pipe = tiny_pipe(kind)
    layers = cross_attention_modules(denoiser_of(pipe))
    result = PureEraser.erase(pipe, _request(keep=["a tree"]), {"steps": 2, "seeds": 1})
    for path, attn in layers.items():
        E = erasure_operator(result.artefacts["forget_bases"][path], result.artefacts["retain_bases"][path])
        for proj in ("to_k", "to_v"):
            projection = getattr(attn, proj)
            original = result.originals[f"{path}.{proj}.weight"]
            torch.testing.assert_close(projection.weight, E.float() @ original, rtol=1e-5, atol=1e-6)
            if projection.bias is not None:
                original_bias = result.originals[f"{path}.{proj}.bias"]
                torch.testing.assert_close(projection.bias, E.float() @ original_bias, rtol=1e-5, atol=1e-6)
    has_bias = any(attn.to_k.bias is not None for attn in layers.values())
    assert has_bias == (kind == "pixart")


def test_pure_without_retain_prompts_projects_out_the_forget_subspace(tiny_pipe):
    pipe = tiny_pipe("sd1")
    request = EraseRequest(concepts=[ConceptRequest("pikachu", "character", FORGET[:3], [])], keep_prompts=[])
    result = PureEraser.erase(pipe, request, {"steps": 2, "seeds": 1})
    for edit in result.layers:
        assert edit.stats["rank_retain"] == 0 and edit.stats["rows_retain"] == 0


def test_pure_rejects_a_prompt_both_forgotten_and_retained(tiny_pipe):
    with pytest.raises(ValueError, match="both forgotten and retained"):
        PureEraser.erase(tiny_pipe("sd1"), _request(retain=[*RETAIN, FORGET[0]]))
