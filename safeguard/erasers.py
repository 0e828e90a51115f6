"""What an eraser plugin receives and returns.

An eraser is a class with ``name``, ``version``, ``kind`` ("weights": edits persist in the saved model),
a pydantic ``Params`` model (validated against the policy's ``eraser.params``) and
``erase(pipe, request, params) -> EraseResult``, which edits ``pipe`` in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ConceptRequest:
    name: str
    category: str
    forget_prompts: list[str]  # anchors that express the concept
    retain_prompts: list[str]  # the concept's neighbours, which must survive


@dataclass
class EraseRequest:
    concepts: list[ConceptRequest]
    keep_prompts: list[str]  # the policy's global keep list
    seed: int = 0

    @property
    def all_retain_prompts(self) -> list[str]:
        seen, out = set(), []
        for p in [*self.keep_prompts, *(r for c in self.concepts for r in c.retain_prompts)]:
            if p not in seen:
                seen.add(p)
                out.append(p)
        return out


@dataclass
class LayerEdit:
    """One edited attention module: statistics for the audit record."""
    module: str  # dotted path inside the denoiser, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    stats: dict[str, Any] = field(default_factory=dict)  # ranks, variance kept, delta norms, rows, seconds


@dataclass
class EraseResult:
    layers: list[LayerEdit]
    # Original values of every tensor the edit changed, keyed by state-dict name inside the denoiser;
    # written to the edit file so `safeguard revert` restores the model bit for bit.
    originals: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)  # whole-edit statistics (seconds, rows, per concept)
    # Optional artefacts probes may reuse. Per-layer bases go under "<kind>_bases" for each kind of
    # BASIS_KINDS ({layer path: Tensor[width, k]}); `apply` saves them with the model (see edit_bases).
    artefacts: dict[str, Any] = field(default_factory=dict)


# The bases a projection eraser used, per layer: the forget basis V_F, the retain basis V_R and the
# forget-only basis span((I - P_R) V_F) the activation screen reads.
BASIS_KINDS = ("forget", "retain", "forget_only")


def edit_bases(artefacts: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """``{layer path: {kind: Tensor}}`` from an EraseResult's artefacts (the kinds of BASIS_KINDS it has), or
    None when it has no bases."""
    bases: dict[str, dict[str, Any]] = {}
    for kind in BASIS_KINDS:
        for layer, basis in (artefacts.get(f"{kind}_bases") or {}).items():
            bases.setdefault(layer, {})[kind] = basis
    return bases or None


def replace_weight(projection, weight, *, key: str, originals: dict[str, Any], stats: dict[str, Any], short: str) -> None:
    """Write ``weight`` into ``projection.weight`` (in its dtype and device), keep the original tensor in
    ``originals[key]`` for the edit file, and record the change as ``delta_norm_<short>`` and
    ``relative_delta_norm_<short>`` in ``stats``."""
    import torch

    original = projection.weight.detach().clone()
    originals[key] = original.cpu()
    projection.weight.copy_(weight.to(original.device, torch.float32).to(original.dtype))
    delta_norm = float((projection.weight.detach().float() - original.float()).norm())
    original_norm = float(original.float().norm())
    stats[f"delta_norm_{short}"] = delta_norm
    stats[f"relative_delta_norm_{short}"] = delta_norm / original_norm if original_norm else 0.0
