"""open_clip zero-shot judge: which of a set of labels an image shows, with the judge's weights hashed.

``judge.checkpoint`` in a policy is either ``embedded:world-judge-v1`` (the judge trained on the embedded
world) or ``MODEL@WEIGHTS``: an open_clip model name and a local weight file or an open_clip pretrained tag
found in the local cache, e.g. ``ViT-B-32@/models/clip-vit-b-32.safetensors``.

The judge computes in float32 on the configured ``--device`` (the device the pipelines run on).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from safeguard import hookimpl

EMBEDDED_PREFIX = "embedded:"
_REGISTERED_CONFIGS: set[str] = set()


class OpenClipJudge:
    name = "open_clip"
    version = "1"

    def __init__(self, checkpoint: str, template: str | None = None, base_dir: Path | None = None, device=None):
        from safeguard import runtime

        runtime.apply_library_settings()
        with runtime.phase(f"loading the open_clip judge {checkpoint}", fix="check judge.checkpoint"):
            self._load(checkpoint, template, base_dir, device)

    def _load(self, checkpoint: str, template: str | None, base_dir: Path | None, device) -> None:
        import open_clip
        import torch

        from safeguard import runtime

        self.device = runtime.resolve_device(device) if not isinstance(device, torch.device) else device
        self.checkpoint = checkpoint
        self.templates = {"subject": template or "a photo of {}", "style": "a painting in the style of {}",
                          "plain_style": "a plain photo"}
        if checkpoint.startswith(EMBEDDED_PREFIX):
            model, preprocess, weights = self._load_embedded(checkpoint[len(EMBEDDED_PREFIX):])
        else:
            model_name, sep, weights_ref = checkpoint.partition("@")
            if not sep:
                from safeguard.errors import PolicyError

                raise PolicyError(f"judge checkpoint {checkpoint!r} is not MODEL@WEIGHTS", field="judge.checkpoint",
                                  fix="write e.g. ViT-B-32@/path/to/weights.safetensors, or embedded:world-judge-v1")
            path = Path(weights_ref) if Path(weights_ref).is_absolute() else (base_dir or Path.cwd()) / weights_ref
            pretrained = str(path) if path.exists() else weights_ref
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
            weights = path if path.exists() else None
            self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model = model.to(self.device, torch.float32).eval().requires_grad_(False)
        self.preprocess = preprocess
        self.weights_path = weights
        self.sha256 = _sha256(weights) if weights else f"open_clip-pretrained:{checkpoint}"
        self._torch = torch
        self._text_cache: dict[str, object] = {}

    def _load_embedded(self, name: str):
        import open_clip
        from safetensors.torch import load_file

        from safeguard.errors import ModelError
        from safeguard.world.assets import EMBEDDED_DIR, minilm_path

        folder = EMBEDDED_DIR / name
        config_path, weights = folder / "open_clip_config.json", folder / "open_clip_model.safetensors"
        if not weights.exists():
            raise ModelError(f"no embedded judge named {name!r}", file=str(folder), field="judge.checkpoint",
                             fix="use embedded:world-judge-v1")
        spec = json.loads(config_path.read_text())
        model_name = f"safeguard-{name}"
        if model_name not in _REGISTERED_CONFIGS:
            cfg = json.loads(json.dumps(spec["model_cfg"]).replace("@minilm", str(minilm_path())))
            tmp = Path(tempfile.mkdtemp(prefix="safeguard-judge-")) / f"{model_name}.json"
            tmp.write_text(json.dumps(cfg))
            open_clip.add_model_config(tmp)
            _REGISTERED_CONFIGS.add(model_name)
        # The frozen text transformer comes from the MiniLM package; the file holds everything else.
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
        missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
        if unexpected or any(not k.startswith("text.transformer.") for k in missing):
            raise ModelError(f"judge weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})",
                             file=str(weights), field="judge.checkpoint", fix="restore the judge files")
        self.templates.update(spec.get("templates", {}))
        self.tokenizer = open_clip.get_tokenizer(model_name)
        return model, preprocess, weights

    def label_text(self, label: str, category: str) -> str:
        if category == "style":
            return self.templates["plain_style"] if label == "plain" else self.templates["style"].format(label)
        return self.templates["subject"].format(label)

    def _text_features(self, texts: list[str]):
        missing = [t for t in texts if t not in self._text_cache]
        if missing:
            with self._torch.no_grad():
                feats = self.model.encode_text(self.tokenizer(missing).to(self.device))
                feats = (feats / feats.norm(dim=-1, keepdim=True)).cpu()
            self._text_cache.update(zip(missing, feats))
        return self._torch.stack([self._text_cache[t] for t in texts])

    def image_features(self, images):
        """Normalised image features, a float32 CPU tensor [images, dim]."""
        with self._torch.no_grad():
            x = self._torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
            feats = self.model.encode_image(x)
            return (feats / feats.norm(dim=-1, keepdim=True)).float().cpu()

    def classify(self, images, label_texts: list[str]):
        """Softmax over label_texts for each image, and the normalised image features."""
        img = self.image_features(images)
        txt = self._text_features(label_texts)
        logits = self.model.logit_scale.exp().cpu() * img @ txt.T
        return logits.softmax(dim=-1).numpy(), img.numpy()


def _sha256(path: Path) -> str:
    from safeguard.modelio import sha256_file

    return sha256_file(path)


@hookimpl
def register_judges(register):
    register(OpenClipJudge)
