"""Shared pytest fixtures."""
import sys

import pytest


def pytest_configure(config):
    # safeguard.plugins skips third-party entry points under test, so only the built-ins register.
    sys._called_from_test = True


# --- tiny diffusers pipelines (tests/fixtures.py) ---------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_pipeline_root(tmp_path_factory):
    """Folder the tiny pipelines are saved to, once per session."""
    import torch

    # Tiny models gain nothing from threads, and other work may be using the cores.
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("tiny-pipelines")


@pytest.fixture
def tiny_pipe(tiny_pipeline_root):
    """Factory: ``tiny_pipe("sd1" | "sd1-bert" | "sdxl" | "pixart")`` -> a freshly loaded tiny pipeline."""
    from fixtures import tiny_pipeline

    return lambda kind: tiny_pipeline(kind, root=tiny_pipeline_root)


@pytest.fixture
def standin_empty_workspace(tmp_path, monkeypatch):
    """An empty working directory with its own audit database and the stand-in judges of
    tests/standin_plugins.py registered."""
    import standin_plugins
    from safeguard.plugins import pm

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFEGUARD_DB", f"sqlite:///{tmp_path}/audit.db")
    pm.register(standin_plugins, name="test-judges")
    try:
        yield tmp_path
    finally:
        pm.unregister(name="test-judges")


@pytest.fixture
def standin_workspace(standin_empty_workspace, tiny_pipeline_root):
    """:func:`standin_empty_workspace` with the tiny "sd1-bert" pipeline copied to ``model``."""
    import shutil

    from fixtures import tiny_pipeline_dir

    shutil.copytree(tiny_pipeline_dir("sd1-bert", root=tiny_pipeline_root), standin_empty_workspace / "model")
    return standin_empty_workspace
