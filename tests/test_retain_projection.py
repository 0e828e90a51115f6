"""retain_projection: E = P_R on keys, values and biases; the same edit as PURE with a full-width forget basis."""
import pytest
import torch
from pydantic import ValidationError

from safeguard.attention import capture_activations, cross_attention_modules, denoiser_of
from safeguard.builtin.pure import PureEraser, forget_only_basis
from safeguard.builtin.retain_projection import RetainProjectionEraser, RetainProjectionParams
from safeguard.erasers import ConceptRequest, EraseRequest

FORGET = ["pikachu in a garden", "pikachu on the beach", "pikachu in the city",
          "pikachu in the forest", "pikachu at night", "pikachu with a cat"]
RETAIN = [template.format(name) for name in ("mario", "snoopy", "stitch")
          for template in ("a photo of {}", "a picture of {}")]


def _request(forget=FORGET, retain=RETAIN, keep=("a tree",)):
    return EraseRequest(concepts=[ConceptRequest("pikachu", "character", list(forget), list(retain))],
                        keep_prompts=list(keep), seed=0)


def _projector(V):
    V = V.double()
    return V @ V.T


def test_registered_with_its_own_params():
    from safeguard.contracts import contract_gaps
    from safeguard.plugins import get_erasers

    assert get_erasers()["retain_projection"] is RetainProjectionEraser
    assert contract_gaps("eraser", RetainProjectionEraser) == [] and RetainProjectionEraser.version
    assert set(RetainProjectionParams.model_fields) == {"tau_retain", "steps", "seeds", "guidance_scale", "batch_size",
                                                        "height", "width"}
    for bad in ({"tau_retain": 0}, {"tau_retain": 1.5}, {"steps": 0}, {"tau_forget": 1.0}, {"tau": 0.9}):
        with pytest.raises(ValidationError):
            RetainProjectionParams(**bad)


@pytest.mark.parametrize("kind", ["sd1", "pixart"])
def test_equals_pure_with_a_full_width_forget_basis(tiny_pipe, kind):
    # 6 anchors x 2 seeds x 6 steps = 72 forget rows, more than any tiny layer's width, so PURE's E is P_R.
    pure_pipe, projection_pipe = tiny_pipe(kind), tiny_pipe(kind)
    pure = PureEraser().erase(pure_pipe, _request(), {"tau_forget": 1.0, "tau_retain": 0.99})
    assert pure.stats["layers_reduced_to_retain_projection"] == len(pure.layers)
    projection = RetainProjectionEraser().erase(projection_pipe, _request(), {"tau_retain": 0.99})
    assert projection.stats["operator"] == "retain_projection" and "reduces_to" not in projection.stats

    assert set(projection.originals) == set(pure.originals)  # weights, and biases where the layer has them
    assert any(name.endswith(".bias") for name in pure.originals) == (kind == "pixart")
    pure_state, projection_state = denoiser_of(pure_pipe).state_dict(), denoiser_of(projection_pipe).state_dict()
    for name in pure.originals:
        torch.testing.assert_close(projection_state[name], pure_state[name], rtol=1e-5, atol=1e-6)
    for path in cross_attention_modules(denoiser_of(projection_pipe)):
        torch.testing.assert_close(projection.artefacts["retain_bases"][path], pure.artefacts["retain_bases"][path])
    assert [e.stats["rank_retain"] for e in projection.layers] == [e.stats["rank_retain"] for e in pure.layers]


def test_edit_is_the_retain_projector_and_keeps_retain_activations(tiny_pipe):
    pipe = tiny_pipe("sd1")
    capture = dict(steps=6, seeds=[0, 1], guidance_scale=5.0)
    retain = [*RETAIN, "a tree"]
    before = capture_activations(pipe, retain, **capture)
    result = RetainProjectionEraser().erase(pipe, _request(), {"tau_retain": 1.0})
    after = capture_activations(pipe, retain, **capture)
    layers = cross_attention_modules(denoiser_of(pipe))
    for edit in result.layers:
        path, width = edit.module, edit.stats["width"]
        V_R = result.artefacts["retain_bases"][path]
        P_R = _projector(V_R).float()
        for proj in ("to_k", "to_v"):
            original = result.originals[f"{path}.{proj}.weight"]
            torch.testing.assert_close(getattr(layers[path], proj).weight, P_R @ original, rtol=1e-5, atol=1e-6)
        # The saved bases say what the edit is: forget = the whole width, forget-only = R's complement.
        torch.testing.assert_close(_projector(result.artefacts["forget_bases"][path]), torch.eye(width, dtype=torch.float64))
        Q = result.artefacts["forget_only_bases"][path]
        assert Q.shape == (width, width - V_R.shape[1])
        torch.testing.assert_close(_projector(Q), torch.eye(width, dtype=torch.float64) - _projector(V_R), rtol=0, atol=1e-5)
        torch.testing.assert_close(_projector(Q), _projector(forget_only_basis(torch.eye(width, dtype=torch.float64),
                                                                                V_R.double())), rtol=0, atol=1e-5)
        # tau_retain 1.0 keeps the whole retain span, so the retain anchors' activations stay where they were.
        relative = float((after[path] - before[path]).norm() / before[path].norm())
        assert relative < 1e-3, f"{path}: retain activations moved by {relative:.2%}"


def test_needs_retain_prompts_and_rejects_overlap(tiny_pipe):
    with pytest.raises(ValueError, match="needs retain prompts"):
        RetainProjectionEraser().erase(tiny_pipe("sd1"), _request(retain=[], keep=[]))
    with pytest.raises(ValueError, match="both forgotten and retained"):
        RetainProjectionEraser().erase(tiny_pipe("sd1"), _request(keep=[FORGET[0]]))


def test_apply_saves_its_bases(tmp_path, tiny_pipeline_root, monkeypatch):
    import shutil

    from fixtures import tiny_pipeline_dir, tiny_policy_text

    from safeguard.engine import apply_policy
    from safeguard.modelio import read_edit_bases
    from safeguard.policy import load_policy

    shutil.copytree(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEGUARD_DB", f"sqlite:///{tmp_path}/audit.db")
    (tmp_path / "policy.yaml").write_text(tiny_policy_text("tiny-rp", eraser="retain_projection"))
    outcome = apply_policy(load_policy(tmp_path / "policy.yaml"), echo=lambda m: None)
    assert outcome.stats["operator"] == "retain_projection"
    bases = read_edit_bases(tmp_path / "edited")
    assert bases is not None and set(bases) == {edit.module for edit in outcome.layers}
    for edit in outcome.layers:
        width = edit.stats["width"]
        assert bases[edit.module]["forget"].shape == (width, width)
        assert bases[edit.module]["retain"].shape == (width, edit.stats["rank_retain"])


def test_module_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys, safeguard.builtin.retain_projection; "
            "loaded = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
