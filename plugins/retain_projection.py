"""Retain projection: keys and values of every cross-attention layer projected onto the retain span.

For every cross-attention layer, the retain anchors' attention outputs (before ``to_out``) are collected on
short denoising trajectories exactly as PURE collects them, a retain basis V_R is kept up to the
cumulative-variance threshold ``tau_retain``, and keys and values are edited once:

    E = P_R = V_R V_Rᵀ        W_K <- E W_K,   W_V <- E W_V   (biases too)

Every direction outside the retain span is removed, whatever it encodes: nothing here is specific to the
banned concepts, whose anchors are not even read. This is what PURE's E = I - P_F (I - P_R) becomes when
the forget basis spans the whole layer (P_F = I, e.g. ``tau_forget: 1.0`` with at least as many forget
rows as the layer width); with the same capture settings and threshold the two edits agree to rounding.

The bases saved with the model say the same: the forget basis is the whole width (the identity) and the
forget-only basis is the orthogonal complement of the retain span.

torch is imported inside functions: ``safeguard plugins`` lists this module without loading torch.
"""
from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from safeguard import hookimpl
from safeguard.builtin.pure import (
    CaptureParams,
    bases_artefacts,
    capture_rows,
    check_prompts,
    explained_variance,
    layer_bases,
    project_layer,
    subspace_basis,
)
from safeguard.erasers import EraseRequest, EraseResult, LayerEdit, editable_layers, validated_params


class RetainProjectionParams(CaptureParams):
    tau_retain: float = Field(
        0.999, gt=0, le=1,
        description="cumulative-variance threshold of the retain basis (uncentred SVD of the retain activations)",
    )


class RetainProjectionEraser:
    """Closed-form K/V projection of every cross-attention layer onto the span of the retain activations."""

    name = "retain_projection"
    version = "1.0.0"
    Params = RetainProjectionParams

    def erase(self, pipe, request: EraseRequest, params: RetainProjectionParams | dict | None = None) -> EraseResult:
        import torch

        params = validated_params(self, params)
        started = time.perf_counter()

        forget_prompts = request.all_forget_prompts
        retain_prompts = request.all_retain_prompts
        if not retain_prompts:
            raise ValueError("retain_projection needs retain prompts (neighbours or keep): with none it would "
                             "remove every key and value")
        check_prompts(forget_prompts, retain_prompts)

        denoiser, layers = editable_layers(pipe)

        H_R = capture_rows(pipe, retain_prompts, **params.capture_settings(request.seed))
        capture_seconds = time.perf_counter() - started

        edits: list[LayerEdit] = []
        originals: dict[str, Any] = {}
        bases: dict[str, dict[str, Any]] = {}
        solve_started = time.perf_counter()
        with torch.no_grad():
            for path, attn in layers.items():
                layer_started = time.perf_counter()
                rows_retain = H_R[path]
                width = rows_retain.shape[1]
                V_R = subspace_basis(rows_retain, params.tau_retain)
                E = V_R @ V_R.T
                stats: dict[str, Any] = {
                    "rank_retain": V_R.shape[1], "width": width,
                    "variance_kept_retain": explained_variance(rows_retain, V_R),
                    "rows_retain": rows_retain.shape[0], "operator": "retain_projection",
                }
                project_layer(attn, path, E, originals=originals, stats=stats)
                stats["seconds"] = time.perf_counter() - layer_started
                edits.append(LayerEdit(module=path, stats=stats))
                bases[path] = layer_bases(torch.eye(width, dtype=torch.float64), V_R)
        solve_seconds = time.perf_counter() - solve_started

        return EraseResult(
            layers=edits,
            originals=originals,
            stats={
                "seconds": time.perf_counter() - started,
                "capture_seconds": capture_seconds,
                "solve_seconds": solve_seconds,
                "layers": len(edits),
                "operator": "retain_projection",
                "forget_prompts": len(forget_prompts),
                "retain_prompts": len(retain_prompts),
                "rows_retain_per_layer": edits[0].stats["rows_retain"],
                "concepts": {c.name: {"forget_prompts": len(c.forget_prompts), "retain_prompts": len(c.retain_prompts)}
                             for c in request.concepts},
                "params": params.model_dump(),
            },
            artefacts=bases_artefacts(bases),
        )


@hookimpl
def register_erasers(register):
    register(RetainProjectionEraser)
