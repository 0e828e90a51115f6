"""Leakage probes: render the same prompts and seeds with the original and the edited model, judge every
image, record every sample, and turn the samples into per-concept, per-probe results.

A probe plugin turns a concept into cases (prompts, or continuous embeddings found by an attack); this
module renders, judges and records them. Results are computed from the recorded samples, so a resumed
run counts the samples of the earlier attempt and never renders them twice. Anything that goes wrong
inside a probe makes that probe "unassessed", never "pass".
"""
from __future__ import annotations

import hashlib
import io
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelError
from .faults import crash_point
from .policy import LoadedPolicy, Policy
from .stats import roc_auc, samples_needed, wilson_interval

STYLE_GENERIC = "plain"  # the label a style probe falls back to when no art style is recognised


@dataclass
class ProbeCase:
    """One prompt (or attack embedding) to render with both models, and what the judge should look for."""
    prompt: str  # shown in the report; for embeddings a description of them
    expected: str  # the label that counts as a hit
    labels: list[str]  # the judge's label set for this case (display names)
    label_texts: list[str]  # the texts the judge embeds for those labels
    prompt_embeds: object | None = None  # a [1, L, D] tensor for continuous attacks


@dataclass
class ProbeCases:
    cases: list[ProbeCase]
    attack: dict | None = None  # budget, seed, prompt found, score: recorded with the result
    images_per_prompt: int | None = None  # attacks find one or two prompts and render each with more seeds


@dataclass
class ProbeContext:
    """What probe plugins may use: the policy, both pipelines and the judge."""
    policy: LoadedPolicy
    original: object
    edited: object
    judge: object
    seed: int = 0

    @property
    def settings(self):
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
        labels, texts = self.concept_labels(concept)
        return [ProbeCase(p, concept.label, labels, texts) for p in prompts[: self.settings.max_prompts]]


def render(pipe, cases: list[ProbeCase], seeds: list[int], settings) -> list[list]:
    """Images for every case and seed, batched; per-image generators make original and edited comparable."""
    import torch

    out: list[list] = [[] for _ in cases]
    jobs = [(i, s) for i, c in enumerate(cases) for s in seeds]
    text_jobs = [j for j in jobs if cases[j[0]].prompt_embeds is None]
    embed_jobs = [j for j in jobs if cases[j[0]].prompt_embeds is not None]
    results: dict = {}
    for start in range(0, len(text_jobs), settings.batch_size):
        chunk = text_jobs[start:start + settings.batch_size]
        images = pipe(prompt=[cases[i].prompt for i, _ in chunk], num_inference_steps=settings.steps,
                      guidance_scale=settings.guidance_scale,
                      generator=[torch.Generator().manual_seed(s) for _, s in chunk]).images
        results.update(zip(chunk, images))
    if embed_jobs:
        negative = _empty_prompt_embeds(pipe)
        for i, s in embed_jobs:
            embeds = cases[i].prompt_embeds.to(pipe.dtype if hasattr(pipe, "dtype") else torch.float32)
            image = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative.expand_as(embeds).to(embeds.dtype),
                         num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                         generator=torch.Generator().manual_seed(s)).images[0]
            results[(i, s)] = image
    for (i, s) in jobs:
        out[i].append(results[(i, s)])
    return out


def _empty_prompt_embeds(pipe):
    embeds, _ = pipe.encode_prompt("", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return embeds


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _store_image(image, evidence_dir: Path) -> tuple[str, str]:
    data = _png_bytes(image)
    digest = hashlib.sha256(data).hexdigest()
    rel = Path("images") / digest[:2] / f"{digest}.png"
    path = evidence_dir / rel
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return rel.as_posix(), digest


@dataclass
class ProbeOutcome:
    concept: str
    probe: str
    kind: str
    status: str
    error: str | None = None
    details: dict = field(default_factory=dict)


def run_probe(ctx: ProbeContext, db, run_id: str, concept, probe_cls, evidence_dir: Path, echo=print) -> ProbeOutcome:
    """Generate, render, judge and record one probe for one concept; never raises for probe failures."""
    settings = ctx.settings
    t0 = time.perf_counter()
    try:
        generated = probe_cls().cases(ctx, concept)
        seeds = [settings.seed + k for k in range(generated.images_per_prompt or settings.images_per_prompt)]
        if not generated.cases:
            return ProbeOutcome(concept.name, probe_cls.name, probe_cls.kind, "unassessed", "the probe produced no prompts")
        done = db.recorded_sample_keys(run_id)
        todo = [c for c in generated.cases
                if any((probe_cls.name, concept.name, role, c.prompt, s) not in done for role in ("original", "edited") for s in seeds)]
        for role, pipe in (("original", ctx.original), ("edited", ctx.edited)):
            if not todo:
                break
            images = render(pipe, todo, seeds, settings)
            rows = []
            for case, per_seed in zip(todo, images):
                probs, _ = ctx.judge.classify(per_seed, case.label_texts)
                for s, image, p in zip(seeds, per_seed, probs):
                    rel, digest = _store_image(image, evidence_dir)
                    best = int(p.argmax())
                    rows.append(dict(probe=probe_cls.name, concept=concept.name, model_role=role, prompt=case.prompt, seed=s,
                                     image_path=rel, image_sha256=digest, label=case.labels[best],
                                     scores={"labels": case.labels, "probs": [round(float(v), 5) for v in p],
                                             "expected": case.expected, "hit": case.labels[best] == case.expected}))
            db.add_samples(run_id, rows)
            crash_point("probe:mid-samples")
        details = {"attack": generated.attack, "seconds": round(time.perf_counter() - t0, 2),
                   "prompts": len(generated.cases), "seeds": seeds}
        echo(f"  {concept.name} / {probe_cls.name}: {len(generated.cases)} prompts x {len(seeds)} seeds ({details['seconds']}s)")
        return ProbeOutcome(concept.name, probe_cls.name, probe_cls.kind, "measured", details=details)
    except Exception as exc:  # a failing probe or judge must not take the run down, and must not pass
        echo(f"  {concept.name} / {probe_cls.name}: unassessed ({type(exc).__name__}: {exc})")
        return ProbeOutcome(concept.name, probe_cls.name, probe_cls.kind, "unassessed",
                            f"{type(exc).__name__}: {exc}"[:1000], {"traceback": traceback.format_exc()[-4000:]})


def summarise(outcome: ProbeOutcome, samples: list[dict], thresholds, judge) -> dict:
    """Probe result row from the recorded samples of one (concept, probe)."""
    orig = [s for s in samples if s["model_role"] == "original"]
    edit = [s for s in samples if s["model_role"] == "edited"]
    row = dict(concept=outcome.concept, probe=outcome.probe, judge_name=judge.name, judge_version=judge.version,
               judge_sha256=judge.sha256, details={**outcome.details, "kind": outcome.kind})
    if outcome.status == "unassessed" or not edit or len(orig) != len(edit):
        why = outcome.error or ("no samples were recorded" if not edit else "original and edited sample counts differ")
        return {**row, "status": "unassessed", "n": len(edit), "hits": None, "rate": None, "ci_low": None, "ci_high": None,
                "threshold": None, "details": {**row["details"], "error": why}}
    hits = sum(bool(s["scores"]["hit"]) for s in edit)
    o_hits = sum(bool(s["scores"]["hit"]) for s in orig)
    lo, hi = wilson_interval(hits, len(edit))
    olo, ohi = wilson_interval(o_hits, len(orig))
    details = {**row["details"], "original": {"n": len(orig), "hits": o_hits, "rate": o_hits / len(orig), "ci_low": olo, "ci_high": ohi}}
    if outcome.kind == "target":
        threshold = thresholds.max_leakage
        if hits / len(edit) > threshold:
            status = "fail"
        elif hi <= threshold:
            status = "pass"
        else:  # the point estimate is within the budget but the evidence cannot show it
            status = "unassessed"
            details["error"] = (f"n={len(edit)} is too few images to show leakage <= {threshold:.2f} at 95% confidence "
                                f"(upper bound {hi:.2f}; at the observed rate {hits / len(edit):.2f} about "
                                f"{samples_needed(hits / len(edit), threshold)} images are needed)")
    else:
        by_key = {(s["prompt"], s["seed"]): s for s in orig}
        agree = [by_key[(s["prompt"], s["seed"])]["label"] == s["label"] for s in edit if (s["prompt"], s["seed"]) in by_key]
        details["label_agreement"] = sum(agree) / len(agree) if agree else None
        retention = (hits / len(edit)) / (o_hits / len(orig)) if o_hits else None
        details["retention"] = retention
        threshold = thresholds.min_retention
        if retention is None:
            status = "unassessed"
            details["error"] = "the original model never rendered these concepts, so retention cannot be measured"
        else:
            status = "pass" if retention >= thresholds.min_retention else "fail"
    return {**row, "status": status, "n": len(edit), "hits": hits, "rate": hits / len(edit), "ci_low": lo, "ci_high": hi,
            "threshold": threshold, "details": details}


def image_similarity(samples: list[dict], evidence_dir: Path, judge) -> float | None:
    """Mean cosine similarity of judge image features, edited vs original, same prompt and seed."""
    from PIL import Image

    orig = {(s["prompt"], s["seed"]): s for s in samples if s["model_role"] == "original"}
    pairs = [(orig[(s["prompt"], s["seed"])], s) for s in samples if s["model_role"] == "edited" and (s["prompt"], s["seed"]) in orig]
    if not pairs:
        return None
    a = judge.image_features([Image.open(evidence_dir / o["image_path"]) for o, _ in pairs])
    b = judge.image_features([Image.open(evidence_dir / e["image_path"]) for _, e in pairs])
    return float((a * b).sum(-1).mean())


# ---- activation screen --------------------------------------------------------------------------------
def activation_screen(ctx: ProbeContext, samples: list[dict], steps: int = 4) -> dict:
    """Share of cross-attention activation energy in each concept's forget-only subspace, per prompt,
    on both models, without decoding images; and how well it predicts the image judge's verdicts."""
    import torch

    from .attention import capture_per_prompt
    from .builtin.pure import forget_only_basis, subspace_basis

    policy = ctx.policy.policy
    params = {"steps": steps, "seeds": [ctx.seed], "guidance_scale": policy.probes.guidance_scale}
    text_samples = [s for s in samples if not s["prompt"].startswith("<")]
    prompts = sorted({s["prompt"] for s in text_samples})
    t0 = time.perf_counter()
    rows, hits_by_prompt = [], {}
    for s in text_samples:
        if s["model_role"] == "edited":
            hits_by_prompt.setdefault((s["concept"], s["prompt"]), []).append(bool(s["scores"]["hit"]) and s["probe"] != "keep")
    per_model = {}
    for role, pipe in (("original", ctx.original), ("edited", ctx.edited)):
        per_model[role] = capture_per_prompt(pipe, prompts, **params)
    for concept in policy.concepts:
        anchors = list(concept.expanded_forget_anchors())
        retain = [p for n in concept.neighbours for p in concept.neighbour_prompts(n)] + list(policy.keep)
        f_rows = capture_per_prompt(ctx.original, anchors, **params)
        r_rows = capture_per_prompt(ctx.original, retain, **params) if retain else {}
        bases = {}
        for layer in next(iter(f_rows.values())):
            hf = torch.cat([f_rows[p][layer] for p in anchors])
            vf = subspace_basis(hf, 0.95)
            vr = subspace_basis(torch.cat([r_rows[p][layer] for p in retain]), 0.95) if retain else None
            bases[layer] = forget_only_basis(vf, vr)
        for prompt in prompts:
            if (concept.name, prompt) not in hits_by_prompt:
                continue
            shares = {}
            for role in ("original", "edited"):
                layer_rows = per_model[role][prompt]
                vals = []
                for layer, q in bases.items():
                    h = layer_rows[layer].double()
                    vals.append(float(((h @ q.double()) ** 2).sum() / (h ** 2).sum().clamp_min(1e-12)))
                shares[role] = sum(vals) / len(vals)
            hits = hits_by_prompt[(concept.name, prompt)]
            rows.append({"concept": concept.name, "prompt": prompt, "original_share": shares["original"],
                         "edited_share": shares["edited"], "judged_hit": sum(hits) / len(hits) >= 0.5})
    auc = roc_auc([r["edited_share"] for r in rows], [r["judged_hit"] for r in rows])
    return {"rows": rows, "agreement": {"auc": auc, "n": len(rows)}, "seconds": round(time.perf_counter() - t0, 2),
            "prompts_screened": len(prompts)}


def verify_model_files(db, model_row: dict, field: str) -> None:
    """Fail unless every audited file of a model is on disk with the audited sha256."""
    from .modelio import hash_model_folder

    root = Path(model_row["path"])
    if not model_row.get("files"):
        return  # a hub model recorded by id only: nothing local to check
    if not root.is_dir():
        raise ModelError("the audited model folder is gone", file=str(root), field=field, fix="restore it or re-run apply")
    current = {f["path"]: f["sha256"] for f in hash_model_folder(root).files}
    for f in model_row["files"]:
        if current.get(f["path"]) != f["sha256"]:
            raise ModelError(f"file {f['path']} differs from the audited model (sha256 {str(current.get(f['path']))[:12]} != {f['sha256'][:12]})",
                             file=str(root), field=field, fix="the model changed after it was audited: re-run apply and probe")
