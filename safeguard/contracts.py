"""The plugin contract: what an eraser, a probe and a judge are, what each receives and what it returns.

A plugin registers classes through the hooks of :mod:`safeguard.hookspecs`; registration checks each class
against its protocol here (:func:`contract_gaps`) and refuses one that lacks part of it, naming what is
missing. ``docs/plugins.md`` is the long form. Nothing here imports torch: types that hold tensors say so
in a comment and are typed ``Any``.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .policy import ConceptSpec, LoadedPolicy, Policy

__all__ = ["ConceptRequest", "EraseRequest", "LayerEdit", "EraseResult", "Eraser", "ProbeCase", "ProbeCases",
           "ProbeContext", "Probe", "ScreenResult", "ScreenProbe", "Judge", "PROBE_KINDS", "PROBE_SCOPES", "SCREEN_KIND",
           "SCREEN_STATUSES", "STYLE_GENERIC", "contract_gaps"]


# --- erasers ----------------------------------------------------------------------------------------------------
@dataclass
class ConceptRequest:
    """One banned concept as the eraser sees it."""
    name: str
    category: str
    forget_prompts: list[str]  # anchors that express the concept
    retain_prompts: list[str]  # the concept's neighbours, which must survive


@dataclass
class EraseRequest:
    """Everything an eraser is asked to do in one edit."""
    concepts: list[ConceptRequest]
    keep_prompts: list[str]  # the policy's global keep list
    seed: int = 0  # first seed of any latents the eraser draws (probes start at a disjoint seed)

    @property
    def all_forget_prompts(self) -> list[str]:
        """Every concept's forget prompts, once each, in order."""
        return list(dict.fromkeys(p for c in self.concepts for p in c.forget_prompts))

    @property
    def all_retain_prompts(self) -> list[str]:
        """The keep prompts and every concept's neighbour prompts, once each, in order."""
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
    """What an eraser returns after editing the pipeline in place."""
    layers: list[LayerEdit]
    # Original values (tensors) of every parameter the edit changed, keyed by state-dict name inside the
    # denoiser; written to the edit file so `safeguard revert` restores the model bit for bit.
    originals: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)  # whole-edit statistics (seconds, rows, per concept)
    # Optional artefacts probes may reuse. Per-layer bases (tensors [width, k]) go under "<kind>_bases" for each
    # kind of safeguard.erasers.BASIS_KINDS; `apply` saves them with the model, where the activation screen
    # probe reads them.
    artefacts: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Eraser(Protocol):
    """Edits a diffusers pipeline in place so that the requested concepts are gone.

    ``Params`` is a pydantic model validated against the policy's ``eraser.params``; apply creates the eraser
    with no arguments and calls ``erase`` once. Every tensor the edit changes goes into
    ``EraseResult.originals``, so the edit can be reverted. An optional ``defaults_evidence`` (str) says
    how the defaults of ``Params`` were chosen, with the numbers; apply writes it into the model card.
    """
    name: ClassVar[str]
    version: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def erase(self, pipe: Any, request: EraseRequest, params: BaseModel) -> EraseResult: ...


# --- probes -----------------------------------------------------------------------------------------------------
PROBE_KINDS = ("target", "keep")  # target: leakage must stay low; keep: edited / original recognition stays high
PROBE_SCOPES = ("concept", "policy")  # run once per banned concept, or once per policy
# A screen probe checks the eraser itself: it runs once per policy after the probes that render, on their recorded
# samples, and is shown in the report but never gated.
SCREEN_KIND = "screen"
SCREEN_STATUSES = ("pass", "fail", "unassessed")  # pass: the screen agrees with the judge's verdicts
STYLE_GENERIC = "plain"  # the label a style probe falls back to when no art style is recognised


@dataclass
class ProbeCase:
    """One prompt (or attack embedding) to render with both models, and what the judge should look for."""
    prompt: str  # shown in the report; for embeddings a description of them
    expected: str  # the label that counts as a hit
    labels: list[str]  # the judge's label set for this case (display names)
    label_texts: list[str]  # the texts the judge embeds for those labels
    prompt_embeds: Any | None = None  # a [1, L, D] tensor for continuous attacks
    # The sub-test the case belongs to: a probe that measures several things at once (collateral damage on
    # every concept outside the policy) decides each group on its own; None is the probe's single group.
    group: str | None = None
    category: str | None = None  # the group's category, for the report
    # SDXL-style pipelines also condition on a pooled text embedding ([1, D] tensor); None: the empty prompt's.
    pooled_prompt_embeds: Any | None = None


@dataclass
class ProbeCases:
    """What a probe returns: its cases, and for attacks what the attack found."""
    cases: list[ProbeCase]
    attack: dict | None = None  # budget, seed, prompt found, score: recorded with the result
    images_per_prompt: int | None = None  # attacks find one or two prompts and render each with more seeds


@dataclass
class ProbeContext:
    """What a probe receives: the policy, both pipelines, the judge and the first probe seed."""
    policy: LoadedPolicy
    original: Any  # the unedited pipeline
    edited: Any  # the pipeline written by apply
    judge: Judge | None
    seed: int = 0
    edited_dir: Path | None = None  # the edited model's folder (bases and edit record saved with the edit)

    @property
    def settings(self):
        """The policy's ``probes`` section (steps, seeds, budgets)."""
        return self.policy.policy.probes

    def concept_labels(self, concept) -> tuple[list[str], list[str]]:
        """Label set for a concept: itself, its neighbours, and the generic fallback(s)."""
        p: Policy = self.policy.policy
        style = concept.category == "style"
        others = [c.label for c in p.concepts if (c.category == "style") == style and c.label != concept.label]
        extra = list(p.judge.extra_style_labels if style else p.judge.extra_labels)
        generic = [STYLE_GENERIC] if style else list(p.judge.generic_labels)
        labels = list(dict.fromkeys([concept.label, *concept.neighbours, *others, *extra, *generic]))
        return labels, [self.judge.label_text(label, concept.category) for label in labels]

    def target_cases(self, concept, prompts) -> list[ProbeCase]:
        """One case per prompt (at most ``probes.max_prompts``) that counts the concept's label as a hit."""
        labels, texts = self.concept_labels(concept)
        return [ProbeCase(p, concept.label, labels, texts) for p in prompts[: self.settings.max_prompts]]


@runtime_checkable
class Probe(Protocol):
    """Turns a banned concept (or, with ``scope = "policy"``, the whole policy) into cases to render.

    The core renders every case on both models, judges and records every image, samples in rounds until
    the interval decides, and turns the samples into a result; a probe that raises is recorded as
    unassessed. A probe of ``kind = "screen"`` implements :class:`ScreenProbe` instead. Optional class
    attributes: ``scope`` ("concept" by default), ``attack`` (True for attacks,
    which the gate's "attack" requirement counts), ``threat_model`` ("text" or "weights": what the attacker
    needs) and, for keep probes, ``threshold`` (the ``thresholds`` field it is judged against, by default
    ``min_retention``).
    """
    name: ClassVar[str]
    kind: ClassVar[str]  # one of PROBE_KINDS

    def cases(self, ctx: ProbeContext, concept: ConceptSpec | None) -> ProbeCases: ...


@dataclass
class ScreenResult:
    """What a screen probe returns: how well its check agrees with the judge's verdicts on the samples."""
    status: str  # one of SCREEN_STATUSES
    n: int = 0  # prompts (or samples) the check scored
    rate: float | None = None  # the agreement measure, e.g. an ROC AUC against the judge
    details: dict[str, Any] = field(default_factory=dict)  # recorded with the result and shown in the report
    note: str | None = None  # one line on what the status means
    error: str | None = None  # why the check could not run (status "unassessed")


@runtime_checkable
class ScreenProbe(Protocol):
    """A probe of the eraser (``kind = "screen"``): instead of cases to render, it reads the samples the other
    probes recorded (``samples``: dicts with ``probe``, ``concept``, ``model_role``, ``prompt``, ``seed``,
    ``label`` and ``scores``) and whatever the edit saved in ``ctx.edited_dir``, and says how well a cheaper
    check agrees with the judge. Its result is recorded once per policy, shown in the report and never gated;
    a screen probe that raises is recorded as unassessed."""
    name: ClassVar[str]
    kind: ClassVar[str]  # SCREEN_KIND

    def screen(self, ctx: ProbeContext, samples: list[dict]) -> ScreenResult: ...


# --- judges -----------------------------------------------------------------------------------------------------
@runtime_checkable
class Judge(Protocol):
    """Says which of a set of labels each image shows.

    Created once per probe run as ``Judge(checkpoint, template, base_dir)`` from the policy's ``judge``
    section; ``sha256`` (the weights' hash, or another stable identifier of them) is recorded with every
    result, so set it in ``__init__`` at the latest.
    """
    name: ClassVar[str]
    version: ClassVar[str]
    sha256: str | None

    def __init__(self, checkpoint: str, template: str | None = None, base_dir: Path | None = None) -> None: ...

    def label_text(self, label: str, category: str) -> str:
        """The text the judge embeds for a label of a concept category ("style", "character", ...)."""

    def classify(self, images: Sequence[Any], label_texts: Sequence[str]) -> tuple[Any, Any]:
        """(probabilities [images, labels], image features [images, dim]) as numpy arrays; rows sum to 1."""

    def image_features(self, images: Sequence[Any]) -> Any:
        """L2-normalised image features [images, dim] (numpy array or CPU tensor), for image similarity."""


# --- checking a class against its contract ----------------------------------------------------------------------
_METHODS = {
    "eraser": {"erase": ("pipe", "request", "params")},
    "probe": {"cases": ("ctx", "concept")},
    "judge": {"label_text": ("label", "category"), "classify": ("images", "label_texts"),
              "image_features": ("images",), "__init__": ("checkpoint", "template", "base_dir")},
}


_SCREEN_METHODS = {"screen": ("ctx", "samples")}  # a screen probe reads samples instead of making cases


def contract_gaps(kind: str, cls: Any) -> list[str]:
    """What ``cls`` lacks of the ``kind`` ("eraser" | "probe" | "judge") contract, one phrase each; [] if none."""
    if kind not in _METHODS:
        raise ValueError(f"kind must be one of {', '.join(_METHODS)}, not {kind!r}")
    if not isinstance(cls, type):
        return [f"a class (got {type(cls).__name__} {cls!r})"]
    gaps = []
    for attribute in ("name", "version") if kind != "probe" else ("name",):
        value = getattr(cls, attribute, None)
        if not isinstance(value, str) or not value:
            gaps.append(f"a non-empty str attribute {attribute!r}")
    if kind == "eraser":
        params = getattr(cls, "Params", None)
        if not (isinstance(params, type) and callable(getattr(params, "model_validate", None))):
            gaps.append("a pydantic model class 'Params' for its policy parameters")
    methods = _METHODS[kind]
    if kind == "probe":
        if getattr(cls, "kind", None) not in (*PROBE_KINDS, SCREEN_KIND):
            gaps.append(f"a 'kind' attribute, one of {', '.join((*PROBE_KINDS, SCREEN_KIND))} "
                        f"(got {getattr(cls, 'kind', None)!r})")
        if getattr(cls, "scope", "concept") not in PROBE_SCOPES:
            gaps.append(f"a 'scope' of {' or '.join(PROBE_SCOPES)} (got {cls.scope!r})")
        if getattr(cls, "kind", None) == SCREEN_KIND:
            methods = _SCREEN_METHODS
    for method, parameters in methods.items():
        gap = _method_gap(cls, method, parameters)
        if gap:
            gaps.append(gap)
    return gaps


def _method_gap(cls: type, method: str, parameters: tuple[str, ...]) -> str | None:
    wanted = f"{method}(self, {', '.join(parameters)})"
    if method == "__init__" and cls.__init__ is object.__init__:
        return None if not parameters else f"an {wanted} accepting the policy's judge settings"
    raw = inspect.getattr_static(cls, method, None)
    if raw is None:
        return f"a method {wanted}"
    if isinstance(raw, (classmethod, staticmethod)):
        return f"{wanted} as an instance method (it is a {type(raw).__name__})"
    if not callable(raw):
        return f"a method {wanted}"
    try:
        signature = inspect.signature(raw)
    except (TypeError, ValueError):
        return None  # a builtin or C method: cannot be inspected, trust it
    given = list(signature.parameters.values())[1:]  # drop self
    if any(p.kind is p.VAR_POSITIONAL for p in given):
        return None
    positional = [p for p in given if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(positional) < len(parameters) or len(required) > len(parameters) or any(
            p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in given):
        shown = ", ".join(["self", *(p.name for p in given)])
        return f"{wanted} taking {len(parameters)} arguments (it is {method}({shown}))"
    return None
