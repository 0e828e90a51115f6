"""Stand-in plugins for tests: judges with a known verdict and an eraser that fails.

Tests register this module in-process (`pm.register(standin_plugins, name=...)`) and give it to child
processes as a one-file plugin (copied into a folder named by SAFEGUARD_PLUGINS_DIR).
"""
import numpy as np
from pydantic import BaseModel, ConfigDict

from safeguard import hookimpl


class _Judge:
    version = "test"
    sha256 = "0" * 64

    def __init__(self, checkpoint, template=None, base_dir=None):
        pass

    def label_text(self, label, category):
        return label

    def image_features(self, images):
        return np.ones((len(images), 2)) / np.sqrt(2)

    def _pick(self, images, label_texts, column):
        probs = np.zeros((len(images), len(label_texts)))
        probs[:, column] = 1
        return probs, self.image_features(images)


class AlwaysTargetJudge(_Judge):
    """Sees the banned concept in every image (worst-case leakage)."""
    name = "always-target"

    def classify(self, images, label_texts):
        return self._pick(images, label_texts, 0)


class NeverTargetJudge(_Judge):
    """Sees only the generic label."""
    name = "never-target"

    def classify(self, images, label_texts):
        return self._pick(images, label_texts, -1)


class CrashingJudge(_Judge):
    name = "crashing"

    def classify(self, images, label_texts):
        raise RuntimeError("judge process died")


class ExplodingEraser:
    name, version = "exploding", "1"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def erase(self, pipe, request, params):
        raise RuntimeError("eraser blew up mid-edit")


@hookimpl
def register_judges(register):
    for judge in (AlwaysTargetJudge, NeverTargetJudge, CrashingJudge):
        register(judge)


@hookimpl
def register_erasers(register):
    register(ExplodingEraser)
