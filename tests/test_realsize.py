"""Real-size architectures with random weights (tests/realsize.py): apply and one probe on each, at reduced
resolution and steps. Opt-in and slow (minutes each; SDXL peaks at about 16 GB of memory):

    pytest -m realsize tests/test_realsize.py -s
"""
import json
import shutil
import time

import pytest
from click.testing import CliRunner

import standin_plugins
from realsize import SAVE_DTYPES, save_realsize
from safeguard import modelio
from safeguard.cli import cli
from safeguard.db import open_db
from safeguard.plugins import pm

pytestmark = pytest.mark.realsize

SIZE = 64  # pixels: 8x8 latents, enough for every down- and upsampling of the three denoisers
POLICY = """\
version: 1
name: realsize-{kind}
model:
  source: model
eraser:
  name: pure
  params: {{steps: 2, seeds: 1, batch_size: 2, height: {size}, width: {size}}}
concepts:
  - name: pikachu
    category: character
    forget_anchors: [a photo of pikachu, pikachu in a garden]
    neighbours: [mario]
    neighbour_anchors:
      mario: [a photo of mario]
probes:
  kinds: [canonical]
  images_per_prompt: 1
  max_images: 1
  max_prompts: 1
  steps: 2
  height: {size}
  width: {size}
thresholds:
  max_leakage: 1.0
  min_elicitation: 0.0
judge:
  name: never-target
  checkpoint: none
gate:
  required: []
output:
  dir: edited
"""
CROSS_ATTENTION_LAYERS = {"sd15": 16, "sdxl": 70, "pixart": 28}
# float32 on the CPU (the default) for SD1.x (saved in float16) and PixArt; SDXL in its own bfloat16
DTYPE_OPTIONS = {"sd15": [], "sdxl": ["--dtype", "bfloat16"], "pixart": []}


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "pixart"])
def test_apply_and_one_probe_at_real_size(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEGUARD_DB", f"sqlite:///{tmp_path}/audit.db")
    timings = {}
    started = time.perf_counter()
    save_realsize(kind, tmp_path / "model")
    timings["build and save"] = time.perf_counter() - started
    (tmp_path / "policy.yaml").write_text(POLICY.format(kind=kind, size=SIZE))
    pm.register(standin_plugins, name="test-judges")
    try:
        started = time.perf_counter()
        applied = CliRunner().invoke(cli, [*DTYPE_OPTIONS[kind], "apply", "policy.yaml"], catch_exceptions=False)
        timings["apply"] = time.perf_counter() - started
        assert applied.exit_code == 0, applied.output
        run_id = open_db().list_runs(1)[0]["id"]
        record = json.loads((tmp_path / "edited" / modelio.EDIT_RECORD).read_text())
        assert len(record["edited_modules"]) == CROSS_ATTENTION_LAYERS[kind]
        denoiser = "unet" if kind != "pixart" else "transformer"
        assert modelio.stored_format(tmp_path / "edited").dtypes[denoiser] == SAVE_DTYPES[kind]  # written as read

        started = time.perf_counter()
        probed = CliRunner().invoke(cli, [*DTYPE_OPTIONS[kind], "probe", run_id], catch_exceptions=False)
        timings["probe"] = time.perf_counter() - started
        assert probed.exit_code == 0, probed.output
    finally:
        pm.unregister(name="test-judges")
    db = open_db()
    probe_run = [r for r in db.child_runs(run_id) if r["kind"] == "probe"][-1]
    samples = db.samples(probe_run["id"])
    assert {s["model_role"] for s in samples} == {"original", "edited"}
    from PIL import Image

    for s in samples:
        assert Image.open(db.evidence_dir() / s["image_path"]).size == (SIZE, SIZE)
    print(f"\n{kind}: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    shutil.rmtree(tmp_path / "model", ignore_errors=True)
    shutil.rmtree(tmp_path / "edited", ignore_errors=True)
