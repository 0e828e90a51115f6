"""The Hugging Face model card of an edited model: ``README.md`` with YAML metadata, in the output folder.

It states what was erased (concepts and categories), how (eraser, version, parameters, edited layers, the
LoRA adapter if one was written), under which policy (name and sha256) by which apply run, and the latest
verdict of the release gate: "not yet probed" when ``apply`` writes it, then rewritten each time ``safeguard
gate`` (or ``safeguard audit``) records a verdict for that run. A model released from the folder documents
itself.

The card is documentation rebuilt from the audit trail, not model content: it is left out of the model's
content hash (:func:`safeguard.modelio.hash_model_folder`), so recording a verdict does not make the audited
model "changed". It is replaced atomically (written beside, then renamed), never left half-written.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

CARD = "README.md"
BASE_TAGS = ("text-to-image", "diffusers", "safeguard", "concept-erasure")


def read_front_matter(path: Path) -> dict[str, Any]:
    """The YAML metadata block of a model card (``---`` ... ``---`` at the top), or {}."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_model_info(source: str, input_folder: Path | None, hub_id: str | None = None) -> dict[str, Any]:
    """What the card says about the input model: its hub id (``base_model``) and license when known.

    A hub id (``hub_id``, or a ``source`` with no local folder) is its own ``base_model``; a local folder (a hub
    model's cached snapshot, a single file's config folder) contributes what its card declares (an edited
    model's card names the model it was edited from), and its license.
    """
    info: dict[str, Any] = {"source": source, "base_model": None, "license": None}
    card = read_front_matter(input_folder / CARD) if input_folder is not None else {}
    if hub_id or input_folder is None:
        info["base_model"] = hub_id or source
    elif isinstance(card.get("base_model"), (str, list)):
        info["base_model"] = card["base_model"]
    if isinstance(card.get("license"), str):
        info["license"] = card["license"]
    return info


def card_text(record: dict[str, Any], policy, verdict: dict[str, Any] | None = None) -> str:
    """The card for an edit ``record`` (``safeguard_edit.json``) made under ``policy`` (a :class:`Policy`).

    ``verdict``: ``{"line", "verdict", "exit_code", "reasons", "probe_run", "at"}`` of the latest recorded gate
    decision, or None before any.
    """
    from . import __version__

    base = record.get("base_model") or {}
    concepts = {c.name: c for c in policy.concepts}
    erased = [concepts.get(name) for name in record.get("concepts", [])]
    eraser = record.get("eraser", "?")
    meta: dict[str, Any] = {}
    if base.get("license"):
        meta["license"] = base["license"]
    meta["library_name"] = "diffusers"
    meta["pipeline_tag"] = "text-to-image"
    if base.get("base_model"):
        meta["base_model"] = base["base_model"]
        meta["base_model_relation"] = "finetune"
    meta["tags"] = [*BASE_TAGS, f"eraser-{eraser}", *sorted({f"erased-{c.category}" for c in erased if c is not None})]
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()

    lines = [f"---\n{header}\n---", "", f"# {policy.name}: concepts erased from {base.get('source') or record.get('source')}", ""]
    lines += [f"This model is `{base.get('source') or record.get('source')}` with the concepts below erased by "
              f"safeguard {__version__}. The edit changes only the key and value projections of the denoiser's "
              "cross-attention layers; every other weight is the input model's.", ""]
    lines += ["## What was erased", "", "| concept | category | forget anchors | kept neighbours |", "|---|---|---|---|"]
    for name in record.get("concepts", []):
        c = concepts.get(name)
        if c is None:
            lines.append(f"| {_cell(name)} | | | |")
            continue
        neighbours = ", ".join(c.neighbours) or "none"
        lines.append(f"| {_cell(name)} | {c.category} | {len(c.expanded_forget_anchors())} | {_cell(neighbours)} |")
    lines += ["", "## How", ""]
    params = json.dumps(record.get("eraser_params") or {}, sort_keys=True)
    lines.append(f"- Eraser: `{eraser}` {record.get('eraser_version', '')} with parameters `{params}`")
    if record.get("eraser_defaults_evidence"):
        lines.append(f"- Why the eraser's defaults are what they are: {_one_line(record['eraser_defaults_evidence'])}")
    modules = record.get("edited_modules") or []
    lines.append(f"- Edited: {len(modules)} cross-attention layers (`to_k` and `to_v`); the original tensors are in "
                 "`safeguard_edit.safetensors` (`safeguard revert` restores them)")
    lines.append(f"- Policy: `{record.get('policy')}`, sha256 `{record.get('policy_sha256')}`")
    lines.append(f"- Apply run: `{record.get('run_id')}` (`safeguard runs show {record.get('run_id')}`)")
    lineage = record.get("lineage") or []
    if len(lineage) > 1:
        lines.append(f"- Lineage: {len(lineage)} edits in a row, the earlier ones by runs "
                     + ", ".join(f"`{step.get('run_id')}`" for step in lineage[:-1]))
    adapter = record.get("lora")
    if adapter:
        lines.append(f"- LoRA adapter: `{adapter.get('file')}` ({adapter.get('modules')} projections, rank at most "
                     f"{adapter.get('max_rank')}, {adapter.get('bytes')} bytes); on the original model, "
                     "`pipe.load_lora_weights(\"<this folder>/lora\")` computes this model")
    single = record.get("single_file")
    if single:
        lines.append(f"- Single-file checkpoint: `{single.get('file')}` ({single.get('format')})")
    lines += ["", "## Verdict", ""]
    if verdict is None:
        lines += ["Not yet probed. `safeguard probe RUN` measures leakage and `safeguard gate RUN` records the verdict "
                  "here.", ""]
    else:
        lines.append(f"**{verdict['line']}**, recorded {verdict.get('at')} for probe run `{verdict.get('probe_run')}`.")
        reasons = verdict.get("reasons") or []
        if reasons:
            lines += ["", *[f"- {_one_line(r)}" for r in reasons[:20]]]
            if len(reasons) > 20:
                lines.append(f"- ... and {len(reasons) - 20} more (`safeguard gate {verdict.get('probe_run')}`)")
        lines += ["", f"The full evidence: `safeguard report {verdict.get('probe_run')} -o report.html`.", ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def write_card(folder: Path, text: str) -> Path:
    """Replace ``folder/README.md`` atomically."""
    path = Path(folder) / CARD
    tmp = path.with_name(f".{CARD}.partial")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def record_verdict(folder: Path, apply_run_id: str, policy, decision, probe_run_id: str) -> Path | None:
    """Rewrite the card of the edited model in ``folder`` with the gate's ``decision``.

    Nothing is written when the folder no longer holds this apply run's edit (a later apply replaced it, or
    it is gone); returns the card's path, or None.
    """
    from .modelio import read_edit_record

    folder = Path(folder)
    try:
        record = read_edit_record(folder)
    except (OSError, ValueError):
        return None
    if not record or record.get("run_id") != apply_run_id:
        return None
    verdict = {"line": decision.line(), "verdict": decision.verdict, "exit_code": int(decision.exit_code),
               "reasons": list(decision.reasons), "probe_run": probe_run_id,
               "at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    return write_card(folder, card_text(record, policy, verdict))
