"""A judge that labels an image by the reference images it is closest to (see README.md)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from safeguard import hookimpl

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SIDE = 16  # images are compared at SIDE x SIDE pixels
TEMPERATURE = 0.05  # softmax temperature over cosine similarities: lower is more decisive


def image_vector(image):
    """An image as a centred, L2-normalised vector of its RGB pixels at SIDE x SIDE."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB").resize((SIDE, SIDE)), dtype=np.float64).ravel() / 255.0
    pixels = pixels - pixels.mean()
    norm = np.linalg.norm(pixels)
    return pixels / norm if norm > 0 else pixels


class ReferenceImageJudge:
    """Nearest reference images: ``checkpoint`` is a folder with one sub-folder of images per label."""

    name = "reference_images"
    version = "0.1.0"

    def __init__(self, checkpoint: str, template: str | None = None, base_dir: Path | None = None):
        import numpy as np
        from PIL import Image

        from safeguard.errors import PolicyError

        folder = Path(checkpoint)
        if not folder.is_absolute():
            folder = (base_dir or Path.cwd()) / folder
        if not folder.is_dir():
            raise PolicyError("the reference folder does not exist", file=str(folder), field="judge.checkpoint",
                              fix="point judge.checkpoint at a folder with one sub-folder of images per label")
        digest = hashlib.sha256()
        self.references = {}
        for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            paths = sorted(p for p in label_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not paths:
                continue
            vectors = []
            for path in paths:
                digest.update(f"{label_dir.name}/{path.name}\n".encode())
                digest.update(path.read_bytes())
                with Image.open(path) as image:
                    vectors.append(image_vector(image))
            centroid = np.mean(vectors, axis=0)
            self.references[label_dir.name] = centroid / (np.linalg.norm(centroid) or 1.0)
        if not self.references:
            raise PolicyError("the reference folder has no label sub-folders with images", file=str(folder),
                              field="judge.checkpoint", fix=f"add images ({', '.join(IMAGE_SUFFIXES)}) under LABEL/")
        self.sha256 = digest.hexdigest()

    def label_text(self, label: str, category: str) -> str:
        # References are looked up by label name, so the text is the label itself whatever the category.
        return label

    def image_features(self, images):
        import numpy as np

        return np.stack([image_vector(image) for image in images])

    def classify(self, images, label_texts):
        import numpy as np

        features = self.image_features(images)
        known = np.array([text in self.references for text in label_texts])
        if not known.any():
            raise ValueError(f"no reference images for any of the labels {list(label_texts)}")
        references = np.stack([self.references.get(text, np.zeros(features.shape[1])) for text in label_texts])
        logits = np.where(known, features @ references.T / TEMPERATURE, -np.inf)
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True), features


@hookimpl
def register_judges(register):
    register(ReferenceImageJudge)
