"""PURE: concept erasure by projecting cross-attention activations (arXiv 2605.25765).

For every cross-attention layer, PURE collects the layer's attention output (before ``to_out``) on short
denoising trajectories of forget anchors and retain anchors, estimates a forget subspace F and a retain
subspace R from the two activation matrices, and edits keys and values once, in closed form:

    E = I - P_F (I - P_R)        W_K <- E W_K,   W_V <- E W_V

E leaves every direction of R unchanged and removes every direction of F orthogonal to R. Because each
attention output is a convex combination of value rows, the edited layer's output is E applied to the
attention-weighted original values: its component along F ∩ R^⊥ is zero whatever the prompt.

torch is imported inside functions: ``safeguard plugins`` lists this module without loading torch.
"""
from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from safeguard import hookimpl
from safeguard.erasers import EraseRequest, EraseResult, LayerEdit


class PureParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tau: float = Field(
        0.99, gt=0, le=1,
        description="cumulative-variance threshold: keep the fewest singular directions whose squared singular "
                    "values reach this fraction of the total. The decomposition is uncentred, so the first "
                    "direction carries the shared mean and most of the energy; 0.99 keeps the directions that "
                    "tell prompts apart, 0.95 often keeps little more than the mean.",
    )
    steps: int = Field(6, ge=1, description="denoising steps per anchor trajectory")
    seeds: int = Field(2, ge=1, description="starting latents per anchor (seeds request.seed, request.seed + 1, ...)")
    guidance_scale: float = Field(5.0, ge=0, description="classifier-free guidance during capture; rows come from the conditional branch")
    center: bool = Field(False, description="subtract the row mean before the SVD (the method is uncentred)")
    max_rank: int | None = Field(None, ge=1, description="upper bound on each basis' rank")
    batch_size: int = Field(8, ge=1, description="prompts per pipeline call during capture")


# ------------------------------------------------------------------------------------------------- math
def subspace_basis(H, tau: float, center: bool = False, max_rank: int | None = None):
    """Orthonormal basis (float64, [width, k]) of the top right-singular vectors of the rows of ``H``.

    ``k`` is the smallest number of directions whose squared singular values reach the fraction ``tau`` of
    the total, bounded by the numerical rank of ``H`` and by ``max_rank``. Returns ``(V, variance_kept)``;
    an empty or all-zero ``H`` gives a basis with no columns and ``variance_kept`` 0.
    """
    import torch

    if not 0 < tau <= 1:
        raise ValueError(f"tau must lie in (0, 1], got {tau}")
    H = torch.as_tensor(H).detach().to("cpu", torch.float64)
    if H.ndim != 2:
        raise ValueError(f"expected a [rows, width] matrix, got shape {tuple(H.shape)}")
    width = H.shape[1]
    if center and H.shape[0] > 0:
        H = H - H.mean(dim=0, keepdim=True)
    if H.shape[0] == 0:
        return torch.zeros(width, 0, dtype=torch.float64), 0.0
    _, singular_values, Vh = torch.linalg.svd(H, full_matrices=False)
    energy = singular_values.square()
    total = energy.sum()
    if total <= 0:
        return torch.zeros(width, 0, dtype=torch.float64), 0.0
    # Directions below the numerical rank are rounding noise, not signal (the matrix_rank tolerance).
    tolerance = singular_values[0] * max(H.shape) * torch.finfo(torch.float64).eps
    rank = int((singular_values > tolerance).sum())
    cumulative = torch.cumsum(energy, dim=0) / total
    k = int(torch.searchsorted(cumulative, torch.tensor([tau], dtype=torch.float64))[0]) + 1
    k = min(k, rank)
    if max_rank is not None:
        k = min(k, max_rank)
    return Vh[:k].T.contiguous(), float(cumulative[k - 1])


def erasure_operator(V_F, V_R):
    """E = I - P_F (I - P_R) for orthonormal bases ``V_F`` [d, k_F] and ``V_R`` [d, k_R] (k_R may be 0)."""
    import torch

    V_F = torch.as_tensor(V_F, dtype=torch.float64)
    V_R = torch.as_tensor(V_R, dtype=torch.float64)
    width = V_F.shape[0]
    if V_R.shape[0] != width:
        raise ValueError(f"bases of different widths: {width} and {V_R.shape[0]}")
    # P_F (I - P_R) = V_F (V_F^T - (V_F^T V_R) V_R^T), without forming either d x d projector.
    forget_part = V_F.T - (V_F.T @ V_R) @ V_R.T
    return torch.eye(width, dtype=torch.float64) - V_F @ forget_part


def apply_operator(E, weight):
    """``E @ weight`` computed in float32 and returned in ``weight``'s dtype and device."""
    import torch

    E = torch.as_tensor(E).to(weight.device, torch.float32)
    return (E @ weight.detach().to(torch.float32)).to(weight.dtype)


# ----------------------------------------------------------------------------------------------- eraser
class PureEraser:
    """Closed-form K/V projection of every cross-attention layer, from forget and retain activations."""

    name = "pure"
    version = "1.0.0"
    kind = "weights"
    Params = PureParams

    @classmethod
    def erase(cls, pipe, request: EraseRequest, params: PureParams | dict | None = None) -> EraseResult:
        import torch

        from safeguard.attention import capture_activations, cross_attention_modules, denoiser_of

        if not isinstance(params, PureParams):
            params = PureParams.model_validate(params or {})
        started = time.perf_counter()

        forget_prompts = list(dict.fromkeys(p for c in request.concepts for p in c.forget_prompts))
        retain_prompts = request.all_retain_prompts
        if not forget_prompts:
            raise ValueError("PURE needs at least one forget prompt")
        both = sorted(set(forget_prompts) & set(retain_prompts))
        if both:
            raise ValueError(f"prompts both forgotten and retained: {both}")

        denoiser = denoiser_of(pipe)
        layers = cross_attention_modules(denoiser)
        if not layers:
            raise ValueError(f"{type(denoiser).__name__} has no cross-attention layers to edit")

        capture = dict(
            steps=params.steps, seeds=[request.seed + i for i in range(params.seeds)],
            guidance_scale=params.guidance_scale, batch_size=params.batch_size,
        )
        H_F = capture_activations(pipe, forget_prompts, **capture)
        H_R = capture_activations(pipe, retain_prompts, **capture) if retain_prompts else {}
        capture_seconds = time.perf_counter() - started

        edits: list[LayerEdit] = []
        originals: dict[str, Any] = {}
        forget_bases: dict[str, Any] = {}
        retain_bases: dict[str, Any] = {}
        solve_started = time.perf_counter()
        with torch.no_grad():
            for path, attn in layers.items():
                layer_started = time.perf_counter()
                rows_forget = H_F[path]
                width = rows_forget.shape[1]
                rows_retain = H_R[path] if retain_prompts else torch.zeros(0, width)
                V_F, kept_forget = subspace_basis(rows_forget, params.tau, params.center, params.max_rank)
                V_R, kept_retain = subspace_basis(rows_retain, params.tau, params.center, params.max_rank)
                E = erasure_operator(V_F, V_R)

                stats: dict[str, Any] = {
                    "rank_forget": V_F.shape[1], "rank_retain": V_R.shape[1],
                    "variance_kept_forget": kept_forget, "variance_kept_retain": kept_retain,
                    "rows_forget": rows_forget.shape[0], "rows_retain": rows_retain.shape[0],
                }
                for projection_name in ("to_k", "to_v"):
                    projection = getattr(attn, projection_name)
                    short = projection_name.removeprefix("to_")
                    weight_name = f"{path}.{projection_name}.weight"
                    original_weight = projection.weight.detach().clone()
                    originals[weight_name] = original_weight.cpu()
                    projection.weight.copy_(apply_operator(E, original_weight))
                    if projection.bias is not None:
                        # The bias is part of every key/value row, so it goes through the same E.
                        originals[f"{path}.{projection_name}.bias"] = projection.bias.detach().cpu().clone()
                        projection.bias.copy_(apply_operator(E, projection.bias.detach()[:, None])[:, 0])
                    delta_norm = float((projection.weight.detach().float() - original_weight.float()).norm())
                    original_norm = float(original_weight.float().norm())
                    stats[f"delta_norm_{short}"] = delta_norm
                    stats[f"relative_delta_norm_{short}"] = delta_norm / original_norm if original_norm else 0.0
                stats["seconds"] = time.perf_counter() - layer_started
                edits.append(LayerEdit(module=path, stats=stats))
                forget_bases[path] = V_F.to(torch.float32)
                retain_bases[path] = V_R.to(torch.float32)
        solve_seconds = time.perf_counter() - solve_started

        return EraseResult(
            layers=edits,
            originals=originals,
            stats={
                "seconds": time.perf_counter() - started,
                "capture_seconds": capture_seconds,
                "solve_seconds": solve_seconds,
                "layers": len(edits),
                "forget_prompts": len(forget_prompts),
                "retain_prompts": len(retain_prompts),
                "rows_forget_per_layer": edits[0].stats["rows_forget"],
                "rows_retain_per_layer": edits[0].stats["rows_retain"],
                "concepts": {c.name: {"forget_prompts": len(c.forget_prompts), "retain_prompts": len(c.retain_prompts)}
                             for c in request.concepts},
                "params": params.model_dump(),
            },
            artefacts={"forget_bases": forget_bases, "retain_bases": retain_bases},
        )


@hookimpl
def register_erasers(register):
    register(PureEraser)
