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


class PixelJudge(_Judge):
    """Scores computed from the pixels (a fast-varying function of the colour means), so every verdict and
    similarity depends on the image itself: equal scores mean equal images."""
    name = "pixel"

    def _means(self, images):
        return np.stack([np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=(0, 1)) / 255.0
                         for image in images])

    def image_features(self, images):
        means = self._means(images) + 1e-3
        return means / np.linalg.norm(means, axis=1, keepdims=True)

    def classify(self, images, label_texts):
        means = self._means(images)
        # A fast-varying function of the pixel means: which label wins changes from image to image.
        logits = np.stack([4 * np.sin(997 * (j + 1) * means.sum(axis=1)) for j in range(len(label_texts))], axis=1)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        return probs / probs.sum(axis=1, keepdims=True), self.image_features(images)


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
    for judge in (AlwaysTargetJudge, NeverTargetJudge, PixelJudge, CrashingJudge):
        register(judge)


@hookimpl
def register_erasers(register):
    register(ExplodingEraser)
