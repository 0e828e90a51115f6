"""An edit as a LoRA adapter: ΔW = W_edited − W_original factorised exactly, in diffusers' PEFT layout.

A closed-form edit that left-multiplies a projection by E changes it by ΔW = (E − I) W. For PURE,
E − I = −P_F (I − P_R), so the rank of ΔW is at most the rank of the forget basis; for any other eraser the
rank is whatever its edit has. The adapter is found from the weights alone, so it serves every eraser:

- ΔW is computed in float64 from the edited and the original tensors;
- when the eraser saved the layer's forget basis V_F (PURE, retain_projection), ΔW = V_F (V_Fᵀ ΔW) is checked
  and the small matrix V_Fᵀ ΔW is decomposed instead of ΔW (an SDXL-size U-Net has hundreds of projections);
  otherwise ΔW itself goes through an SVD;
- singular values at or below the rounding level of the weights' dtype (``max(shape) · eps · ‖W‖_F``,
  ``matrix_rank``'s tolerance with the Frobenius norm, which bounds the spectral one) are dropped: they are the rounding of E·W to the stored dtype, not part of
  the edit. What is dropped is recorded as each module's relative reconstruction error.

The factors ``B = U √σ`` ([out, r]) and ``A = √σ Vᵀ`` ([r, in]) are written as ``lora_B``/``lora_A`` under the
denoiser's prefix (``unet.<module>.lora_A.weight``), the keys ``save_lora_weights`` writes, without alphas, so
diffusers' convention (alpha = rank, scale 1) gives W + B A. A changed bias goes in ``lora_B.bias``.
``pipe.load_lora_weights(folder)`` on the original model then computes the edited model.

torch is imported inside functions.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError

LORA_DIR = "lora"  # inside the output folder
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default weight_name for load_lora_weights
LORA_SUMMARY = "safeguard_lora.json"  # ranks, errors and size, beside the weights


@dataclass
class LoraAdapter:
    """The factors of one edit: ``tensors`` in diffusers' naming and one summary row per module."""
    prefix: str  # "unet" or "transformer": the pipeline component the keys start with
    tensors: dict[str, Any]
    modules: list[dict] = field(default_factory=list)  # {module, rank, shape, relative_error, bias}

    @property
    def ranks(self) -> list[int]:
        return [m["rank"] for m in self.modules]

    def summary(self) -> dict:
        ranks = self.ranks
        parameters = sum(int(t.numel()) for t in self.tensors.values())
        return {"prefix": self.prefix, "modules": len(self.modules), "max_rank": max(ranks, default=0),
                "total_rank": sum(ranks), "parameters": parameters,
                "max_relative_error": max((m["relative_error"] for m in self.modules), default=0.0),
                "ranks": {m["module"]: m["rank"] for m in self.modules}}


def rounding_tolerance(weight_norm: float, shape: tuple[int, ...], dtype) -> float:
    """Singular values of a weight difference at or below this are rounding of the stored dtype."""
    import torch

    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return max(shape) * eps * weight_norm


def low_rank_factors(delta, tolerance: float, column_basis=None):
    """``(B [out, r], A [r, in], dropped)`` with ``B @ A`` equal to ``delta`` up to ``tolerance``.

    ``column_basis`` (orthonormal [out, k], optional) is a basis believed to contain the columns of ``delta``;
    it is used only when ``delta`` really lies in it (the residual is at most ``tolerance``). ``dropped`` is
    the largest singular value left out (0 when none).
    """
    import torch

    delta = torch.as_tensor(delta, dtype=torch.float64)
    left = None
    target = delta
    if column_basis is not None and column_basis.shape[0] == delta.shape[0] and column_basis.shape[1] < min(delta.shape):
        Q = torch.as_tensor(column_basis, dtype=torch.float64)
        reduced = Q.T @ delta
        if float(torch.linalg.matrix_norm(delta - Q @ reduced)) <= tolerance:  # Frobenius: bounds the spectral norm
            left, target = Q, reduced
    U, singular_values, Vh = torch.linalg.svd(target, full_matrices=False)
    keep = singular_values > tolerance
    rank = int(keep.sum())
    dropped = float(singular_values[rank]) if rank < singular_values.shape[0] else 0.0
    root = singular_values[:rank].sqrt()
    U = U[:, :rank] if left is None else left @ U[:, :rank]
    return U * root, root[:, None] * Vh[:rank], dropped


def edit_adapter(denoiser, originals: dict[str, Any], prefix: str, bases: dict[str, dict] | None = None) -> LoraAdapter:
    """The LoRA factors of every linear layer whose weight or bias an edit changed.

    ``originals`` are the edit's original tensors keyed by state-dict name inside ``denoiser`` (an
    ``EraseResult.originals``); the edited values are read from ``denoiser``. ``bases`` are the eraser's
    per-layer bases (``{layer: {"forget": V_F, ...}}``), used only to factorise faster.
    """
    import torch

    modules = sorted({key.rpartition(".")[0] for key in originals if key.endswith((".weight", ".bias"))})
    tensors: dict[str, Any] = {}
    rows: list[dict] = []
    with torch.no_grad():
        for name in modules:
            try:
                layer = denoiser.get_submodule(name)
            except AttributeError:
                raise ModelError(f"the edit names module {name!r}, which the denoiser does not have", field="output.lora",
                                 fix="report this with the --debug traceback") from None
            if not isinstance(layer, torch.nn.Linear):
                raise ModelError(f"the edit changed {name} ({type(layer).__name__}); LoRA adapters cover linear layers only",
                                 field="output.lora", fix="set output.lora: false for this eraser")
            weight = layer.weight.detach()
            original_weight = originals.get(f"{name}.weight", weight)
            delta = weight.to("cpu", torch.float64) - torch.as_tensor(original_weight).to("cpu", torch.float64)
            # The Frobenius norm bounds the spectral one and needs no SVD of the full weight.
            weight_norm = max(float(torch.linalg.matrix_norm(weight.to("cpu", torch.float64))),
                              float(torch.linalg.matrix_norm(torch.as_tensor(original_weight).to("cpu", torch.float64))))
            tolerance = rounding_tolerance(weight_norm, tuple(delta.shape), weight.dtype)
            forget = ((bases or {}).get(name.rpartition(".")[0]) or {}).get("forget")
            B, A, _ = low_rank_factors(delta, tolerance, forget)
            bias_delta = None
            if f"{name}.bias" in originals and layer.bias is not None:
                bias_delta = layer.bias.detach().to("cpu", torch.float64) - torch.as_tensor(originals[f"{name}.bias"]).to("cpu", torch.float64)
                if not bool(bias_delta.any()):
                    bias_delta = None
            if B.shape[1] == 0 and bias_delta is None:
                continue  # the edit left this layer as it was, up to rounding
            if B.shape[1] == 0:  # only the bias moved: one zero direction carries it
                B, A = torch.zeros(delta.shape[0], 1, dtype=torch.float64), torch.zeros(1, delta.shape[1], dtype=torch.float64)
            error = float(torch.linalg.matrix_norm(delta - B @ A)) / max(float(torch.linalg.matrix_norm(torch.as_tensor(original_weight).double())), 1e-30)
            key = f"{prefix}.{name}"
            tensors[f"{key}.lora_A.weight"] = A.to(torch.float32).contiguous()
            tensors[f"{key}.lora_B.weight"] = B.to(torch.float32).contiguous()
            if bias_delta is not None:
                tensors[f"{key}.lora_B.bias"] = bias_delta.to(torch.float32).contiguous()
            rows.append({"module": name, "rank": int(B.shape[1]), "shape": list(delta.shape), "relative_error": error,
                         "bias": bias_delta is not None})
    if any(t["bias"] for t in rows) and not all(t["bias"] for t in rows):
        # diffusers turns lora_bias on for the whole adapter when any lora_B has a bias: give the others zeros.
        for row in rows:
            if not row["bias"]:
                out_features = tensors[f"{prefix}.{row['module']}.lora_B.weight"].shape[0]
                tensors[f"{prefix}.{row['module']}.lora_B.bias"] = torch.zeros(out_features)
    return LoraAdapter(prefix, tensors, rows)


def check_exportable(pipe) -> None:
    """Refuse, before the edit, a pipeline whose denoiser diffusers cannot load LoRA adapters into."""
    from diffusers.loaders.peft import PeftAdapterMixin

    from .modelio import denoiser_name

    name = denoiser_name(pipe)
    denoiser = getattr(pipe, name)
    if not hasattr(pipe, "load_lora_weights") or not isinstance(denoiser, PeftAdapterMixin):
        raise ModelError(f"diffusers cannot load LoRA adapters into {type(pipe).__name__} ({type(denoiser).__name__}), "
                         "so an exported adapter could not reproduce the edit", field="output.lora",
                         fix="set output.lora: false (the edited model folder is written either way)")


def write_adapter(adapter: LoraAdapter, folder: Path, metadata: dict[str, str] | None = None) -> dict:
    """Write ``folder/pytorch_lora_weights.safetensors`` and its summary; returns the summary with the size."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LORA_WEIGHTS
    save_file(adapter.tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    summary = {**adapter.summary(), "file": f"{LORA_DIR}/{LORA_WEIGHTS}", "bytes": os.path.getsize(path),
               "load": f"pipe.load_lora_weights('<folder>/{LORA_DIR}')"}
    (folder / LORA_SUMMARY).write_text(json.dumps({**summary, "layers": adapter.modules}, indent=2, sort_keys=True))
    return summary
