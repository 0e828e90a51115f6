"""One progress display (counts, elapsed, ETA) for capture, every probe and every attack: on a terminal, off with
--quiet, off elsewhere unless --progress asks for it."""
import io
import re
import shutil

import pytest
from click.testing import CliRunner

import standin_plugins
from fixtures import tiny_pipeline_dir, tiny_policy_text
from safeguard import runtime
from safeguard.cli import cli
from safeguard.plugins import pm


class _Tty(io.StringIO):
    def isatty(self):
        return True


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture(autouse=True)
def default_settings(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    runtime.reset()
    yield
    runtime.reset()


def test_eta_from_the_average_item_time(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(runtime.time, "monotonic", clock)
    stream = _Tty()
    bar = runtime.Progress("probe pikachu / canonical: images", 10, stream=stream)
    clock.now += 30
    bar.advance(3)  # 10 s an image: 7 left
    assert stream.getvalue() == "\rprobe pikachu / canonical: images: 3/10 (30s, ETA 1m10s)"
    clock.now += 40
    bar.advance(7)
    assert stream.getvalue().split("\r")[-1].rstrip() == "probe pikachu / canonical: images: 10/10 (1m10s)"  # done: no ETA
    bar.close()


def test_forced_progress_writes_log_lines_at_an_interval(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(runtime.time, "monotonic", clock)
    runtime.configure(progress=True)
    stream = io.StringIO()  # not a terminal: a log
    bar = runtime.Progress("attack Ring-A-Bell: generations", 4, stream=stream)
    assert bar.enabled
    clock.now += 1
    bar.advance()  # too soon for a new log line
    clock.now += runtime.Progress.LOG_INTERVAL
    bar.advance()
    clock.now += 1
    bar.advance()
    bar.advance()  # the last one is always written
    bar.close()
    assert stream.getvalue().splitlines() == ["attack Ring-A-Bell: generations: 2/4 (11s, ETA 11s)",
                                              "attack Ring-A-Bell: generations: 4/4 (12s)"]
    assert "\r" not in stream.getvalue()


def test_quiet_beats_progress_and_ci_needs_progress(monkeypatch):
    runtime.configure(progress=True, quiet=True)
    assert not runtime.Progress("x", 1, stream=_Tty()).enabled
    runtime.configure(quiet=False, progress=False)
    monkeypatch.setenv("CI", "true")
    assert not runtime.Progress("x", 1, stream=_Tty()).enabled
    runtime.configure(progress=True)
    assert runtime.Progress("x", 1, stream=io.StringIO()).enabled


def test_track_counts_every_item(monkeypatch):
    runtime.configure(progress=True)
    stream = io.StringIO()
    monkeypatch.setattr(runtime.sys, "stderr", stream)
    assert list(runtime.track(range(3), "attack soft prompt: optimiser steps")) == [0, 1, 2]
    assert stream.getvalue().splitlines()[-1].startswith("attack soft prompt: optimiser steps: 3/3 (")


def test_an_attack_search_shows_progress(tiny_pipe, monkeypatch):
    from safeguard.builtin.attacks import ring_a_bell

    runtime.configure(progress=True)
    stream = io.StringIO()
    monkeypatch.setattr(runtime.sys, "stderr", stream)
    ring_a_bell(tiny_pipe("sd1"), ["a photo of pikachu"], ["a photo of a cat"], budget=3, population=6, length=3)
    assert stream.getvalue().splitlines()[-1].startswith("attack Ring-A-Bell: generations: 3/3 (")


@pytest.fixture
def ws(tmp_path, tiny_pipeline_root, monkeypatch):
    shutil.copytree(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEGUARD_DB", f"sqlite:///{tmp_path}/audit.db")
    (tmp_path / "policy.yaml").write_text(tiny_policy_text("tiny-progress", judge="never-target"))
    pm.register(standin_plugins, name="test-judges")
    try:
        yield tmp_path
    finally:
        pm.unregister(name="test-judges")


def test_capture_and_every_probe_report_progress_with_progress_and_none_with_quiet(ws):
    applied = CliRunner().invoke(cli, ["--progress", "apply", "policy.yaml"], catch_exceptions=False)
    assert applied.exit_code == 0, applied.output
    assert re.search(r"^capturing activations: (\d+)/\1 \(", applied.stderr, re.M), applied.stderr
    run_id = re.search(r"^run (\S+): wrote", applied.stdout, re.M).group(1)
    probed = CliRunner().invoke(cli, ["--progress", "probe", run_id], catch_exceptions=False)
    assert probed.exit_code == 0, probed.output
    for probe in ("canonical", "paraphrase"):
        assert re.search(rf"^probe pikachu / {probe}: images: \d+/\d+ \(", probed.stderr, re.M), probed.stderr
    quiet = CliRunner().invoke(cli, ["--progress", "-q", "apply", "policy.yaml", "--out", "edited-2"], catch_exceptions=False)
    assert quiet.exit_code == 0 and "capturing activations" not in quiet.stderr
