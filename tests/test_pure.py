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
    energy_removed,
    erased_basis,
    erasure_operator,
    explained_variance,
    forget_only_basis,
    reduces_to_retain_projection,
    retain_projection_distance,
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


def test_energy_removed_is_what_the_operator_takes_from_the_rows():
    g = torch.Generator().manual_seed(3)
    Q = _orthonormal(12, 4, g)
    only_forget, shared, only_retain = Q[:, :1], Q[:, 1:2], Q[:, 2:4]
    # Forget rows: half their energy on a forget-only direction, half on a direction the retain rows share.
    H_F = torch.cat([torch.cat([only_forget.T, shared.T]) * c for c in (1.0, 2.0)])
    H_R = torch.cat([shared.T, only_retain.T])
    E = erasure_operator(Q[:, :2], torch.cat([shared, only_retain], 1))
    assert energy_removed(H_F, E) == pytest.approx(0.5)
    assert energy_removed(H_R, E) == pytest.approx(0.0, abs=1e-12)
    # A forget concept inside the retain span: nothing is removed, whatever the forget basis.
    assert energy_removed(shared.T, erasure_operator(shared, shared)) == pytest.approx(0.0, abs=1e-12)
    assert energy_removed(torch.zeros(2, 12), E) == 0.0


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

    result = PureEraser().erase(pipe, _request(), PureParams())

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

    result = PureEraser().erase(pipe, _request(keep=["a tree"]), {"steps": 2, "seeds": 1})

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
        assert 0 <= stats["retain_energy_removed"] <= 1 and 0 < stats["forget_energy_removed"] <= 1
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
    result = PureEraser().erase(pipe, _request(keep=["a tree"]), {"steps": 2, "seeds": 1})
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
    result = PureEraser().erase(pipe, request, {"steps": 2, "seeds": 1})
    for edit in result.layers:
        assert edit.stats["rank_retain"] == 0 and edit.stats["rows_retain"] == 0


def test_pure_rejects_a_prompt_both_forgotten_and_retained(tiny_pipe):
    with pytest.raises(ValueError, match="both forgotten and retained"):
        PureEraser().erase(tiny_pipe("sd1"), _request(retain=[*RETAIN, FORGET[0]]))


# ------------------------------------------------------------------------------------------ collapse to P_R
def test_full_width_forget_basis_reduces_to_the_retain_projection():
    V_F, V_R, _, g = _forget_and_retain()
    d = V_F.shape[0]
    assert not reduces_to_retain_projection(V_F, V_R)
    assert retain_projection_distance(V_F, V_R) > 0.1
    full = _orthonormal(d, d, g)  # rank F = width: P_F = I, E = P_R
    assert reduces_to_retain_projection(full, V_R)
    torch.testing.assert_close(erasure_operator(full, V_R), _projector(V_R), rtol=0, atol=1e-12)
    # A forget basis that holds the whole orthogonal complement of R gives E = P_R below full rank too.
    complement = torch.linalg.svd(torch.eye(d, dtype=torch.float64) - _projector(V_R))[0][:, : d - V_R.shape[1]]
    assert complement.shape[1] < d and reduces_to_retain_projection(complement, V_R)
    assert retain_projection_distance(complement, V_R) < 1e-12
    # No retain basis: a full-width forget basis removes everything (E = 0 = P_R).
    assert reduces_to_retain_projection(full, None) and not reduces_to_retain_projection(V_F, None)


def test_pure_detects_and_reports_the_collapse_per_layer(tiny_pipe):
    rows = len(FORGET) * 2 * 6  # 72 forget rows per layer, more than the widest layer (64)
    collapsed = PureEraser().erase(tiny_pipe("sd1"), _request(), {"tau_forget": 1.0})
    widths = {edit.stats["width"] for edit in collapsed.layers}
    assert max(widths) <= rows
    for edit in collapsed.layers:
        assert edit.stats["rank_forget"] == edit.stats["width"]
        assert edit.stats["operator"] == "retain_projection"
        assert edit.stats["distance_to_retain_projection"] < 1e-6
    n = len(collapsed.layers)
    assert collapsed.stats["reduces_to"] == "retain_projection"
    assert collapsed.stats["layers_reduced_to_retain_projection"] == n
    assert collapsed.stats["operator"] == "retain_projection"

    default = PureEraser().erase(tiny_pipe("sd1"), _request(), None)
    assert default.stats["operator"] == "pure" and default.stats["reduces_to"] is None
    assert default.stats["layers_reduced_to_retain_projection"] == 0
    for edit in default.layers:
        assert edit.stats["operator"] == "pure" and edit.stats["rank_forget"] < edit.stats["width"]
        assert edit.stats["distance_to_retain_projection"] > 1e-3


def test_single_tau_is_the_default_and_overrides_apply_separately(tiny_pipe):
    params = PureParams()
    assert params.tau_forget is None and params.tau_retain is None
    one = PureEraser().erase(tiny_pipe("sd1"), _request(), {"tau": 0.99, "steps": 2, "seeds": 1})
    both = PureEraser().erase(tiny_pipe("sd1"), _request(), {"tau_forget": 0.99, "tau_retain": 0.99, "steps": 2, "seeds": 1})
    assert [e.stats["rank_forget"] for e in one.layers] == [e.stats["rank_forget"] for e in both.layers]
    assert [e.stats["rank_retain"] for e in one.layers] == [e.stats["rank_retain"] for e in both.layers]


def test_pure_returns_the_forget_only_bases(tiny_pipe):
    result = PureEraser().erase(tiny_pipe("sd1"), _request(), {"steps": 2, "seeds": 1})
    assert set(result.artefacts) == {"forget_bases", "retain_bases", "forget_only_bases"}
    for edit in result.layers:
        V_F = result.artefacts["forget_bases"][edit.module].double()
        V_R = result.artefacts["retain_bases"][edit.module].double()
        Q = result.artefacts["forget_only_bases"][edit.module]
        assert Q.dtype == torch.float32
        expected = forget_only_basis(V_F, V_R)
        torch.testing.assert_close(_projector(Q.double()), _projector(expected), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------ apply: saved bases
APPLY_POLICY = """\
version: 1
name: tiny-bases
model:
  source: model
eraser:
  name: {eraser}
  params: {params}
concepts:
  - name: pikachu
    category: character
    forget_anchors: [a photo of pikachu, pikachu in a garden, pikachu on the beach, pikachu at night]
    neighbours: [mario]
    neighbour_anchors:
      mario: [a photo of mario, mario in a garden]
keep: [a photo of a cat]
output:
  dir: edited
"""


@pytest.fixture
def workspace(tmp_path, tiny_pipeline_root, monkeypatch):
    import shutil

    from fixtures import tiny_pipeline_dir

    shutil.copytree(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEGUARD_DB", f"sqlite:///{tmp_path}/audit.db")
    return tmp_path


def _apply_cli(ws, eraser="pure", params="{steps: 2, seeds: 1}"):
    from click.testing import CliRunner

    from safeguard.cli import cli

    (ws / "policy.yaml").write_text(APPLY_POLICY.format(eraser=eraser, params=params))
    result = CliRunner().invoke(cli, ["apply", "policy.yaml"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_apply_saves_the_bases_with_the_model(workspace):
    from safetensors.torch import load_file

    from safeguard.modelio import EDIT_BASES, EDIT_TENSORS, hash_model_folder, load_pipeline, read_edit_bases

    result = _apply_cli(workspace)
    assert "this edit is not PURE" not in result.output
    out = workspace / "edited"
    assert (out / EDIT_BASES).exists()
    assert EDIT_BASES in {f["path"] for f in hash_model_folder(out).files}  # hashed with the model files
    bases = read_edit_bases(out)
    unet = load_pipeline(out).unet
    layers = cross_attention_modules(unet)
    assert set(bases) == set(layers)
    originals = load_file(out / EDIT_TENSORS)
    for path, attn in layers.items():
        assert set(bases[path]) == {"forget", "retain", "forget_only"}
        V_F, V_R, Q = bases[path]["forget"], bases[path]["retain"], bases[path]["forget_only"]
        assert all(b.dtype == torch.float32 and b.shape[0] == attn.inner_dim for b in (V_F, V_R, Q))
        torch.testing.assert_close(_projector(Q.double()), _projector(forget_only_basis(V_F.double(), V_R.double())),
                                   rtol=0, atol=1e-4)
        # The saved bases are the ones the edit used: they rebuild the edited weights from the originals.
        E = erasure_operator(V_F.double(), V_R.double()).float()
        for proj in ("to_k", "to_v"):
            original = originals[f"unet/{path}.{proj}.weight"]
            torch.testing.assert_close(getattr(attn, proj).weight, E @ original, rtol=1e-4, atol=1e-5)


def test_saved_bases_round_trip(tmp_path, tiny_pipe):
    from safeguard.modelio import read_edit_bases, write_pipeline_atomically

    g = torch.Generator().manual_seed(5)
    bases = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2": {
        "forget": _orthonormal(32, 3, g), "retain": torch.zeros(32, 0, dtype=torch.float64),
        "forget_only": _orthonormal(32, 3, g)}}
    out = write_pipeline_atomically(tiny_pipe("sd1"), tmp_path / "out", originals={}, record={"run_id": "x"},
                                    denoiser_name="unet", bases=bases)
    read = read_edit_bases(out)
    assert read.keys() == bases.keys()
    for layer, kinds in bases.items():
        assert read[layer].keys() == kinds.keys()
        for kind, basis in kinds.items():
            assert read[layer][kind].dtype == torch.float32 and read[layer][kind].shape == basis.shape
            assert torch.equal(read[layer][kind], basis.float())
    assert read_edit_bases(tmp_path) is None


def test_revert_does_not_carry_the_bases(workspace):
    from click.testing import CliRunner

    from safeguard.cli import cli
    from safeguard.modelio import EDIT_BASES, read_edit_bases

    _apply_cli(workspace)
    result = CliRunner().invoke(cli, ["revert", "edited", "--out", "restored"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not (workspace / "restored" / EDIT_BASES).exists() and read_edit_bases(workspace / "restored") is None


def test_apply_prints_a_notice_when_pure_reduces_to_a_retain_projection(workspace):
    # 4 anchors x 2 seeds x 10 steps = 80 forget rows per layer, more than the widest layer (64).
    result = _apply_cli(workspace, params="{tau_forget: 1.0, steps: 10, seeds: 2}")
    lines = [line for line in result.output.splitlines() if "reduces to a projection" in line]
    assert [line.strip() for line in lines] == [
        "PURE with these thresholds reduces to a projection onto the retain span in 4/4 layers; this edit is not PURE"]
