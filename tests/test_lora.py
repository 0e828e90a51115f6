"""The edit as a LoRA adapter: exact low-rank factors that diffusers' load_lora_weights applies to the original model."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from safeguard import lora
from safeguard.cli import cli
from safeguard.db import open_db
from safeguard.erasers import ConceptRequest, EraseRequest, edit_bases
from safeguard.errors import ModelError
from safeguard.modelio import EDIT_RECORD, hash_model_folder, load_pipeline
from safeguard.plugins import get_erasers

REQUEST = EraseRequest([ConceptRequest("pikachu", "character", ["a photo of pikachu", "pikachu in a garden"],
                                       ["a photo of mario"])], ["a photo of a cat"])
PARAMS = {"pure": {"steps": 2, "seeds": 1}, "uce": {}}
PROMPTS = ["a photo of pikachu", "a cat in a garden"]
# float32 rounding of outputs of order one, after a few layers: far below the edit's own effect (checked too)
FLOAT_PRECISION = 1e-5


def unet_outputs(pipe, kind):
    """The denoiser's output on fixed latents, prompts and timestep (SDXL: with its pooled embeddings and time ids)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=g)
    with torch.no_grad():
        if kind == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
            time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * len(PROMPTS), dtype=torch.float32)
            extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        else:
            embeds = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
            extra = {}
        return pipe.unet(latents, 10, encoder_hidden_states=embeds, **extra).sample


def images(pipe):
    return pipe(PROMPTS, num_inference_steps=2, output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in range(len(PROMPTS))]).images


# ------------------------------------------------------------------------------------------------ factors
def test_low_rank_factors_recover_the_rank_under_rounding_noise():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 32, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(48, 3, generator=g, dtype=torch.float64))
    exact = -Q @ (Q.T @ weight)  # a projection edit of rank 3
    edited = (weight + exact).to(torch.float32)  # what a float32 model stores
    delta = edited.double() - weight.to(torch.float32).double()
    assert int(torch.linalg.matrix_rank(delta)) > 3  # rounding made the stored difference full rank
    tolerance = lora.rounding_tolerance(float(weight.norm()), tuple(delta.shape), torch.float32)
    for basis in (None, Q):
        B, A, dropped = lora.low_rank_factors(delta, tolerance, basis)
        assert B.shape == (48, 3) and A.shape == (3, 32)
        assert float((B @ A - delta).abs().max()) <= tolerance and dropped <= tolerance


def test_a_column_basis_that_does_not_hold_the_edit_is_not_used():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(16, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 12, generator=g, dtype=torch.float64)
    wrong, _ = torch.linalg.qr(torch.randn(16, 2, generator=g, dtype=torch.float64))
    B, A, _ = lora.low_rank_factors(delta, 1e-9, wrong)
    assert B.shape[1] == 4 and torch.allclose(B @ A, delta, atol=1e-9)


# ------------------------------------------------------------------------------------- reproduces the edit
def require_peft():
    # A dev dependency: a missing peft fails these tests instead of skipping what they prove.
    try:
        import peft  # noqa: F401
    except ImportError:
        pytest.fail("diffusers' load_lora_weights needs peft: pip install -e '.[dev]'")


@pytest.mark.parametrize("kind,eraser", [("sd1", "pure"), ("sd1", "uce"), ("sdxl", "pure")])
def test_adapter_on_the_original_model_reproduces_the_edited_model(tiny_pipe, tmp_path, kind, eraser):
    require_peft()
    edited = tiny_pipe(kind)
    result = get_erasers()[eraser]().erase(edited, REQUEST, PARAMS[eraser])
    adapter = lora.edit_adapter(edited.unet, result.originals, "unet", edit_bases(result.artefacts))
    summary = lora.write_adapter(adapter, tmp_path / "lora")

    changed = sorted(k.removesuffix(".weight") for k in result.originals if k.endswith(".weight"))
    assert [m["module"] for m in adapter.modules] == changed
    assert summary["bytes"] == (tmp_path / "lora" / lora.LORA_WEIGHTS).stat().st_size
    if eraser == "pure":  # ΔW = -P_F (I - P_R) W has at most the forget basis' rank
        forget_rank = {layer.module: layer.stats["rank_forget"] for layer in result.layers}
        for module in adapter.modules:
            assert 1 <= module["rank"] <= forget_rank[module["module"].rpartition(".")[0]]
    for module in adapter.modules:
        assert module["rank"] < min(module["shape"])  # the adapter is smaller than the weights it changes

    original = tiny_pipe(kind)
    before = unet_outputs(original, kind)
    original.load_lora_weights(str(tmp_path / "lora"))
    with_adapter, target = unet_outputs(original, kind), unet_outputs(edited, kind)
    assert float((target - before).abs().max()) > 100 * FLOAT_PRECISION  # the edit itself is visible
    assert float((with_adapter - target).abs().max()) < FLOAT_PRECISION
    if kind == "sd1":
        assert float(abs(images(original) - images(edited)).max()) < FLOAT_PRECISION


def test_pixart_is_refused_before_the_edit(tiny_pipe):
    with pytest.raises(ModelError) as info:
        lora.check_exportable(tiny_pipe("pixart"))
    line = info.value.one_line()
    assert "PixArtTransformer2DModel" in line and "output.lora" in line and "\n" not in line


# ---------------------------------------------------------------------------------------------- via apply
POLICY = """\
version: 1
name: tiny-lora
model:
  source: model
eraser:
  name: pure
  params: {steps: 2, seeds: 1}
concepts:
  - name: pikachu
    category: character
    forget_anchors: [a photo of pikachu, pikachu in a garden]
    neighbours: [mario]
keep: [a photo of a cat]
output:
  dir: edited
"""


def test_apply_lora_writes_the_adapter_into_the_audited_folder(tmp_path, tiny_pipeline_root, monkeypatch):
    require_peft()
    from fixtures import tiny_pipeline_dir

    shutil.copytree(tiny_pipeline_dir("sd1", root=tiny_pipeline_root), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEGUARD_DB", f"sqlite:///{tmp_path}/audit.db")
    (tmp_path / "policy.yaml").write_text(POLICY)
    result = CliRunner().invoke(cli, ["apply", "policy.yaml", "--lora"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "edited"
    weights = out / lora.LORA_DIR / lora.LORA_WEIGHTS
    assert weights.exists() and not list(tmp_path.glob(".edited.partial-*"))

    record = json.loads((out / EDIT_RECORD).read_text())["lora"]
    assert record["bytes"] == weights.stat().st_size and record["max_rank"] >= 1
    db = open_db()
    run = db.list_runs(1)[0]
    data = db.run_as_dict(run["id"])
    assert data["run"]["stats"]["lora"] == record  # the audit trail has the adapter's ranks and size
    audited = {f["path"] for f in data["output_model"]["files"]}
    assert f"{lora.LORA_DIR}/{lora.LORA_WEIGHTS}" in audited  # hashed with the model: the gate sees any change
    assert data["output_model"]["tree_sha256"] == hash_model_folder(out).tree_sha256

    original, edited = load_pipeline(tmp_path / "model"), load_pipeline(out)
    original.load_lora_weights(str(out / lora.LORA_DIR))
    assert float(abs(images(original) - images(edited)).max()) < FLOAT_PRECISION


def test_apply_without_lora_writes_none(tmp_path, tiny_pipeline_root, monkeypatch):
    from fixtures import tiny_pipeline_dir

    shutil.copytree(tiny_pipeline_dir("sd1", root=tiny_pipeline_root), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEGUARD_DB", f"sqlite:///{tmp_path}/audit.db")
    (tmp_path / "policy.yaml").write_text(POLICY)
    result = CliRunner().invoke(cli, ["apply", "policy.yaml"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "edited" / lora.LORA_DIR).exists()
    assert "lora" not in json.loads((tmp_path / "edited" / EDIT_RECORD).read_text())
