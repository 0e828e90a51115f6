"""Render a probe run's report data (a JSON-serialisable dict) as one self-contained HTML file, a Markdown
summary for pull-request comments, or canonical JSON.

The dict is built from the audit database elsewhere; this module only checks its shape and presents it.
Evidence is never dropped silently: an image that cannot be embedded becomes a visible placeholder and is
counted in a warning at the top of the report.
"""
from __future__ import annotations

import base64
import copy
import functools
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from .contracts import PROBE_KINDS
from .db.schema import PROBE_STATUSES
from .gate import VERDICTS, ExitCode, GateDecision

SCHEMA_VERSION = 1
# The gate's verdicts and the exit code each one must carry.
EXIT_CODES = {name: v.exit_code for name, v in VERDICTS.items()}
_VERDICT_WORDS = {name: v.word for name, v in VERDICTS.items()}

_REQUIRED = {
    "top": ("schema_version", "generated_at", "run", "policy", "verdict", "concepts"),
    "run": ("id", "kind", "status"),
    "policy": ("name", "sha256"),
    "verdict": ("verdict", "exit_code"),
    "concept": ("name", "category", "verdict", "probes"),
    "probe": ("probe", "kind", "status", "n", "hits", "rate", "ci_low", "ci_high", "threshold"),
    "counts": ("n", "hits", "rate", "ci_low", "ci_high"),
    "attack": ("budget", "seed"),
    "sample": ("prompt", "seed", "original", "edited"),
    "image": ("image_path",),
    "model": ("source", "tree_sha256"),
    "model_file": ("path", "sha256"),
    "screen": ("agreement", "rows"),
    "agreement": ("n",),
    "screen_row": ("prompt", "concept", "original_share", "edited_share"),
    "layer": ("module", "stats"),
}

# Keys the renderer fills with None when absent, so the templates can stay strict about typos.
_OPTIONAL = {
    "top": ("apply_run", "models", "judge", "activation_screen", "layers", "evidence_rules"),
    "run": ("started_at", "finished_at", "user", "host", "argv", "versions"),
    "policy": ("canonical_json", "text"),
    "verdict": ("reasons",),
    "probe": ("original", "retention", "retention_low", "retention_high", "similarity", "error", "attack", "samples",
              "assessment", "power", "substitution", "groups", "interval", "plan", "threat_model", "decision", "gated"),
    "attack": ("prompt", "embedding_tokens", "init_prompt", "steps_used", "score"),
    "image": ("label", "score"),
    "apply_run": ("id", "eraser_name", "eraser_version", "eraser_params", "stats"),
    "model": ("files",),
    "model_file": ("size",),
    "judge": ("name", "version", "sha256", "labels_note"),
    "agreement": ("auc", "accuracy", "positives"),
    "screen_row": ("judged_hit",),
}

# Magic numbers of the image formats a browser shows from a data URI without plugins.
_IMAGE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))


# ---------------------------------------------------------------------------------------------- public API

def render_html(data: dict, evidence_dir: Path, *, blur_unsafe: bool = False) -> str:
    """One HTML file with every image inlined; `blur_unsafe` blurs images of "unsafe"-category concepts."""
    validate_report_data(data)
    data = with_defaults(data)
    images = _EvidenceImages(Path(evidence_dir), blur_unsafe)
    concepts = [_concept_view(i, c, images) for i, c in enumerate(data["concepts"])]
    template = _environment(autoescape=True).get_template("report.html.j2")
    return template.render(
        data=data, concepts=concepts,
        headline=verdict_line(data), unassessed=_unassessed(data), problems=images.problems,
        disagreements=status_disagreements(data),
        blur_unsafe=blur_unsafe, layer_columns=_layer_columns(data.get("layers") or []),
        policy_text=_policy_text(data["policy"]), argv=_argv_text(data["run"].get("argv")),
    )


def render_markdown(data: dict) -> str:
    """A short summary for pull-request comments: verdict, exit code, one row per concept and probe."""
    validate_report_data(data)
    data = with_defaults(data)
    template = _environment(autoescape=False).get_template("summary.md.j2")
    rows = [(c, p) for c in data["concepts"] for p in c["probes"]]
    return template.render(data=data, rows=rows, headline=verdict_line(data), unassessed=_unassessed(data))


def render_json(data: dict) -> str:
    """Canonical JSON of the report data: sorted keys, indent 2, NaN refused (it is not JSON)."""
    validate_report_data(data)
    return json.dumps(data, sort_keys=True, indent=2, allow_nan=False)


def validate_report_data(data: dict) -> None:
    """Raise ValueError naming the first missing required key or impossible value."""
    _require(data, "top", "")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"report data has schema_version {data['schema_version']!r}; "
                         f"this safeguard renders schema_version {SCHEMA_VERSION}")
    for key in ("run", "policy", "verdict"):
        _require(data[key], key, key)
    for key in ("apply_run", "judge", "models"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ValueError(f"report data: {key} must be an object or null")
    _check_verdict(data["verdict"])
    if not isinstance(data["concepts"], list):
        raise ValueError("report data: concepts must be a list")
    for i, concept in enumerate(data["concepts"]):
        _check_concept(concept, f"concepts[{i}]")
    _check_optional_sections(data)


def verdict_line(data: dict) -> str:
    """The verdict exactly as the gate prints it, e.g. "FAIL: leakage over threshold (exit 10)"."""
    verdict = data["verdict"]
    return GateDecision(verdict["verdict"], ExitCode(verdict["exit_code"])).line()


# ---------------------------------------------------------------------------------------------- validation

def _require(obj: Any, shape: str, where: str) -> None:
    label = where or "the top level"
    if not isinstance(obj, dict):
        raise ValueError(f"report data: {label} must be an object, got {type(obj).__name__}")
    for key in _REQUIRED[shape]:
        if key not in obj:
            raise ValueError(f"report data is missing required key {where + '.' if where else ''}{key}")


def _check_verdict(verdict: dict) -> None:
    name, code = verdict["verdict"], verdict["exit_code"]
    if name not in EXIT_CODES:
        raise ValueError(f"report data: verdict.verdict is {name!r}; expected one of {sorted(EXIT_CODES)}")
    # A printed verdict that disagrees with the exit code is worse than no report.
    if code != EXIT_CODES[name]:
        raise ValueError(f"report data: verdict {name!r} must have exit_code {int(EXIT_CODES[name])}, got {code!r}")


def _check_concept(concept: dict, where: str) -> None:
    _require(concept, "concept", where)
    if not isinstance(concept["probes"], list):
        raise ValueError(f"report data: {where}.probes must be a list")
    for j, probe in enumerate(concept["probes"]):
        _check_probe(probe, f"{where}.probes[{j}]")


def _check_probe(probe: dict, where: str) -> None:
    _require(probe, "probe", where)
    if probe["status"] not in PROBE_STATUSES:
        raise ValueError(f"report data: {where}.status is {probe['status']!r}; expected one of {PROBE_STATUSES}")
    if probe["kind"] not in PROBE_KINDS:
        raise ValueError(f"report data: {where}.kind is {probe['kind']!r}; expected one of {PROBE_KINDS}")
    if probe.get("original") is not None:
        _require(probe["original"], "counts", f"{where}.original")
    if probe.get("attack") is not None:
        _require(probe["attack"], "attack", f"{where}.attack")
    for k, sample in enumerate(probe.get("samples") or []):
        _require(sample, "sample", f"{where}.samples[{k}]")
        for side in ("original", "edited"):
            if sample[side] is not None:  # None: no image recorded for that side, shown as missing
                _require(sample[side], "image", f"{where}.samples[{k}].{side}")


def _check_optional_sections(data: dict) -> None:
    for side, model in (data.get("models") or {}).items():
        if model is None:
            continue  # shown as "not recorded"
        _require(model, "model", f"models.{side}")
        for i, f in enumerate(model.get("files") or []):
            _require(f, "model_file", f"models.{side}.files[{i}]")
    screen = data.get("activation_screen")
    if screen is not None:
        _require(screen, "screen", "activation_screen")
        _require(screen["agreement"], "agreement", "activation_screen.agreement")
        for i, row in enumerate(screen["rows"]):
            _require(row, "screen_row", f"activation_screen.rows[{i}]")
    for i, layer in enumerate(data.get("layers") or []):
        _require(layer, "layer", f"layers[{i}]")


def with_defaults(data: dict) -> dict:
    """A deep copy of valid report data with every absent optional key present as None."""
    out = _filled(copy.deepcopy(data), "top")
    for key in ("run", "policy", "verdict", "apply_run", "judge"):
        _filled(out[key], key)
    for model in filter(None, (out["models"] or {}).values()):
        for f in _filled(model, "model")["files"] or []:
            _filled(f, "model_file")
    for probe in (p for c in out["concepts"] for p in c["probes"]):
        _filled(probe, "probe")
        _filled(probe["attack"], "attack")
        for sample in probe["samples"] or []:
            for side in ("original", "edited"):
                sample[side] = _filled(sample[side] or {"image_path": None}, "image")
    if out["activation_screen"] is not None:
        _filled(out["activation_screen"]["agreement"], "agreement")
        for row in out["activation_screen"]["rows"]:
            _filled(row, "screen_row")
    return out


def _filled(obj: dict | None, shape: str) -> dict | None:
    for key in _OPTIONAL[shape] if obj is not None else ():
        obj.setdefault(key, None)
    return obj


# ---------------------------------------------------------------------------------------------- images

@dataclass(frozen=True)
class ImageView:
    path: str
    category: str
    label: str | None
    score: float | None
    uri: str | None = None
    problem: str | None = None
    blurred: bool = False


@dataclass(frozen=True)
class ImageProblem:
    where: str
    path: str
    problem: str


class _EvidenceImages:
    """Turns evidence paths into data URIs and remembers every image it could not embed."""

    def __init__(self, evidence_dir: Path, blur_unsafe: bool):
        self.root = evidence_dir.resolve()
        self.blur_unsafe = blur_unsafe
        self.problems: list[ImageProblem] = []
        self._uris: dict[str, tuple[str | None, str | None]] = {}  # the same file is often shown twice

    def view(self, image: dict, category: str, where: str) -> ImageView:
        path = str(image.get("image_path") or "")
        if path not in self._uris:
            self._uris[path] = self._data_uri(path)
        uri, problem = self._uris[path]
        if problem:
            self.problems.append(ImageProblem(where, path or "(none recorded)", problem))
        return ImageView(path=path, category=category, label=image.get("label"), score=image.get("score"),
                         uri=uri, problem=problem, blurred=self.blur_unsafe and category == "unsafe")

    def _data_uri(self, path: str) -> tuple[str | None, str | None]:
        if not path:
            return None, "no image path recorded"
        file = (self.root / path).resolve()
        # The path comes from the database; never inline files from outside the evidence folder.
        if not file.is_relative_to(self.root):
            return None, "path points outside the evidence folder"
        try:
            content = file.read_bytes()
        except FileNotFoundError:
            return None, "file not found"
        except OSError as exc:
            return None, f"unreadable ({exc.strerror or exc})"
        mime = next((m for sig, m in _IMAGE_SIGNATURES if content.startswith(sig)), None)
        if mime is None:
            return None, "not a PNG, JPEG or GIF image"
        return f"data:{mime};base64,{base64.b64encode(content).decode('ascii')}", None


# ---------------------------------------------------------------------------------------------- view model

def _concept_view(index: int, concept: dict, images: _EvidenceImages) -> dict:
    probes = [_probe_view(concept, p, images) for p in concept["probes"]]
    return {"concept": concept, "anchor": f"concept-{index + 1}", "probes": probes,
            "blurred": images.blur_unsafe and concept["category"] == "unsafe"}


def _probe_view(concept: dict, probe: dict, images: _EvidenceImages) -> dict:
    samples = []
    for sample in probe.get("samples") or []:
        where = f"{concept['name']} / {probe['probe']} / seed {sample['seed']}"
        samples.append({
            "sample": sample,
            "original": images.view(sample["original"], concept["category"], f"{where} / original"),
            "edited": images.view(sample["edited"], concept["category"], f"{where} / edited"),
        })
    return {"probe": probe, "chart": interval_chart(probe), "samples": samples}


def status_disagreements(data: dict) -> list[str]:
    """Probes whose recorded status is not what the figures and the threshold rule give: a sign of a bug
    upstream that a reviewer must see, since the report states the rule next to the figures."""
    out = []
    for concept in data["concepts"]:
        for probe in concept["probes"]:
            expected = _expected_status(probe)
            if expected is not None and expected != probe["status"]:
                out.append(f"{concept['name']} / {probe['probe']}: recorded {probe['status']}, "
                           f"the figures give {expected} ({threshold_text(probe)})")
    return out


def _expected_status(probe: dict) -> str | None:
    """The status the recorded figures give under the gate's rules (None where they cannot say)."""
    if probe["status"] == "unassessed" or probe["threshold"] is None:
        return None
    groups = probe.get("groups") or []
    if groups:  # several groups: any fail fails; a pass needs the pooled decision and no group below threshold
        statuses = {g.get("status") for g in groups}
        pooled = (probe.get("decision") or {}).get("status")
        if "fail" in statuses:
            return "fail"
        return "pass" if statuses <= {"pass", "consistent"} and pooled == "pass" else "unassessed"
    if probe.get("decision"):
        status = probe["decision"].get("status")
        return "unassessed" if status == "uninformative" else status
    if probe["kind"] == "keep":
        low, retention = probe.get("retention_low"), probe.get("retention")
        if low is None or retention is None:
            return None
        return "pass" if low >= probe["threshold"] else ("fail" if retention < probe["threshold"] else "unassessed")
    if probe["ci_high"] is None or probe["rate"] is None:
        return None
    if (probe.get("substitution") or {}).get("status") == "fail" or probe["rate"] > probe["threshold"]:
        return "fail"
    return "pass" if probe["ci_high"] <= probe["threshold"] else None


def _layer_columns(layers: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for layer in layers for k in (layer["stats"] or {})))


def _unassessed(data: dict) -> list[tuple[dict, dict]]:
    return [(c, p) for c in data["concepts"] for p in c["probes"] if p["status"] == "unassessed"]


def _policy_text(policy: dict) -> str | None:
    canonical = policy.get("canonical_json")
    if isinstance(canonical, (dict, list)):
        return json.dumps(canonical, sort_keys=True, indent=2)
    return canonical


def _argv_text(argv: Any) -> str | None:
    if argv is None:
        return None
    return shlex.join(str(a) for a in argv) if isinstance(argv, list) else str(argv)


# ---------------------------------------------------------------------------------------------- formatting

def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def interval(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "—"
    return f"{100 * low:.1f}–{100 * high:.1f}%"


def threshold_text(probe: dict) -> str:
    if probe["threshold"] is None:
        return "no threshold recorded"
    if probe["kind"] == "keep":
        return f"retention lower bound ≥ {percent(probe['threshold'])}"
    return f"upper bound ≤ {percent(probe['threshold'])}"


def status_word(probe: dict) -> str:
    """The status shown: an unassessed probe whose prompts never elicited the concept is "uninformative"."""
    return "uninformative" if probe.get("assessment") == "uninformative" else probe["status"]


def images_used(probe: dict) -> str:
    """How many looks each group's decision took, e.g. "2 of 4 rounds"."""
    plan = probe.get("plan") or []
    if not plan:
        return "—"
    if len(plan) == 1:
        return f"{plan[0]['looks_used']} of {plan[0]['looks']} rounds"
    used = sum(p["looks_used"] for p in plan)
    return f"{used} rounds over {len(plan)} groups (at most {max(p['looks'] for p in plan)} each)"


def attack_found(attack: dict) -> str | None:
    """What the attack found, as text; None when it found a prompt (shown verbatim instead)."""
    if attack.get("prompt") is not None:
        return None
    tokens = attack.get("embedding_tokens")
    return f"continuous embedding, {tokens} tokens" if tokens else "nothing found"


def stat_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def byte_size(size: int | None) -> str:
    if size is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def markdown_text(value: Any) -> str:
    """Text safe inside a Markdown table cell: no pipes, no line breaks, no live HTML."""
    text = "" if value is None else str(value)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in "\\|`*_[]":
        text = text.replace(char, "\\" + char)
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------- SVG chart

_CHART_WIDTH, _LABEL_WIDTH, _PLOT_WIDTH, _ROW_HEIGHT, _TOP, _BOTTOM = 590, 104, 320, 24, 24, 24
_STATUS_COLOURS = {"pass": "#1a7f37", "fail": "#c62828", "unassessed": "#b26a00", "uninformative": "#b26a00"}
_ORIGINAL_COLOUR = "#9aa4ae"


def interval_chart(probe: dict) -> Markup:
    """Horizontal bars of the proportion on the original and edited model, Wilson 95% interval as error bars,
    and the threshold as a dashed line (for keep probes, on an extra retention row)."""
    rows = _chart_rows(probe)
    height = _TOP + _ROW_HEIGHT * len(rows) + _BOTTOM
    parts = [_axis(height)]
    for i, row in enumerate(rows):
        parts.append(_chart_row(row, _TOP + i * _ROW_HEIGHT))
    parts.append(_threshold_line(probe, rows))
    title = f"{probe['probe']}: proportion per model with 95% interval; threshold {threshold_text(probe)}"
    return Markup(
        f'<svg class="chart" role="img" aria-label="{escape(title)}" width="{_CHART_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_CHART_WIDTH} {height}"><title>{escape(title)}</title>{"".join(parts)}</svg>')


def _chart_rows(probe: dict) -> list[dict]:
    rows = []
    original = probe.get("original")
    if original is not None:
        rows.append({"label": "original model", "value": original["rate"], "low": original["ci_low"],
                     "high": original["ci_high"], "colour": _ORIGINAL_COLOUR, "key": "original"})
    rows.append({"label": "edited model", "value": probe["rate"], "low": probe["ci_low"], "high": probe["ci_high"],
                 "colour": _STATUS_COLOURS[probe["status"]], "key": "edited"})
    if probe["kind"] == "keep":
        rows.append({"label": "retention", "value": probe.get("retention"), "low": None, "high": None,
                     "colour": _STATUS_COLOURS[probe["status"]], "key": "retention",
                     "note": f"(min {percent(probe['threshold'])})" if probe["threshold"] is not None else ""})
    return rows


def _x(value: float) -> float:
    return _LABEL_WIDTH + _PLOT_WIDTH * min(max(value, 0.0), 1.0)


def _axis(height: int) -> str:
    bottom = height - _BOTTOM
    ticks = []
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        x = _x(tick)
        ticks.append(f'<line x1="{x:.1f}" y1="{_TOP - 4}" x2="{x:.1f}" y2="{bottom}" class="grid"/>'
                     f'<text x="{x:.1f}" y="{bottom + 15}" text-anchor="middle" class="tick">{tick:.0%}</text>')
    return "".join(ticks)


def _chart_row(row: dict, y: float) -> str:
    label = (f'<text x="{_LABEL_WIDTH - 8}" y="{y + 16}" text-anchor="end" class="row-label">'
             f'{escape(row["label"])}</text>')
    if row["value"] is None:
        return label + f'<text x="{_x(0) + 6}" y="{y + 16}" class="no-data">no measurement</text>'
    bar = (f'<rect x="{_x(0):.1f}" y="{y + 5}" width="{_x(row["value"]) - _x(0):.1f}" height="14" '
           f'fill="{row["colour"]}" class="bar bar-{row["key"]}"/>')
    error = ""
    if row["low"] is not None and row["high"] is not None:
        x1, x2, mid = _x(row["low"]), _x(row["high"]), y + 12
        error = (f'<line x1="{x1:.1f}" y1="{mid}" x2="{x2:.1f}" y2="{mid}" class="ci"/>'
                 f'<line x1="{x1:.1f}" y1="{mid - 6}" x2="{x1:.1f}" y2="{mid + 6}" class="ci"/>'
                 f'<line x1="{x2:.1f}" y1="{mid - 6}" x2="{x2:.1f}" y2="{mid + 6}" class="ci"/>')
    value = percent(row["value"])
    if row["low"] is not None and row["high"] is not None:
        value += f"  [{interval(row['low'], row['high'])}]"
    if row.get("note"):
        value += f"  {row['note']}"
    text = f'<text x="{_x(1.0) + 10}" y="{y + 16}" class="value">{escape(value)}</text>'
    return label + bar + error + text


def _threshold_line(probe: dict, rows: list[dict]) -> str:
    threshold = probe["threshold"]
    key = "retention" if probe["kind"] == "keep" else "edited"
    if threshold is None or next(r for r in rows if r["key"] == key)["value"] is None:
        return ""  # nothing measured to compare with; the row says so
    x = _x(threshold)
    if probe["kind"] == "keep":
        # The keep threshold bounds the retention, so the line stays on that row (its value text names it).
        index = next(i for i, r in enumerate(rows) if r["key"] == "retention")
        y1, y2 = _TOP + index * _ROW_HEIGHT + 1, _TOP + (index + 1) * _ROW_HEIGHT - 1
        label = ""
    else:
        y1, y2 = _TOP - 6, _TOP + len(rows) * _ROW_HEIGHT
        label = (f'<text x="{x:.1f}" y="{_TOP - 9}" text-anchor="middle" class="threshold-label">'
                 f'max {escape(percent(threshold))}</text>')
    return (f'<line x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y2}" class="threshold-halo"/>'
            f'<line x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y2}" class="threshold"/>{label}')


# ---------------------------------------------------------------------------------------------- templates

@functools.lru_cache(maxsize=2)
def _environment(*, autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("safeguard.templates", "."),
        autoescape=autoescape, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(percent=percent, stat=stat_value, bytes=byte_size, md=markdown_text)
    env.globals.update(interval=interval, threshold_text=threshold_text, attack_found=attack_found,
                       status_word=status_word, images_used=images_used,
                       verdict_words=_VERDICT_WORDS)
    return env

