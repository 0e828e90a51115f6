"""Helpers for eraser plugins: writing an edited weight with its original kept, and the bases saved with an edit.

The eraser contract itself (``Eraser``, ``EraseRequest``, ``EraseResult``, ...) is in :mod:`safeguard.contracts`;
its types are importable from here too.
"""
from __future__ import annotations

from typing import Any

from .contracts import ConceptRequest, EraseRequest, EraseResult, LayerEdit

__all__ = ["BASIS_KINDS", "ConceptRequest", "EraseRequest", "EraseResult", "LayerEdit", "edit_bases",
           "editable_layers", "replace_weight", "validated_params"]


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


def validated_params(eraser, params):
    """``params`` as the eraser's ``Params`` model: validated from a dict (None: the defaults) or as given."""
    if isinstance(params, eraser.Params):
        return params
    return eraser.Params.model_validate(params or {})


def editable_layers(pipe) -> tuple[Any, dict[str, Any]]:
    """(the denoiser, ``{module path: Attention}`` of its cross-attention layers); refuses a denoiser with none."""
    from .attention import cross_attention_modules, denoiser_of

    denoiser = denoiser_of(pipe)
    layers = cross_attention_modules(denoiser)
    if not layers:
        raise ValueError(f"{type(denoiser).__name__} has no cross-attention layers to edit")
    return denoiser, layers
