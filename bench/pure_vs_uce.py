"""PURE against the faithful UCE baseline (and the E = P_R operator, under its own name) on the same policy:
leakage on canonical and held-out paraphrase prompts, retention of neighbours, kept prompts and of every
concept outside the policy (held-out collateral prompts), and edit time, all measured in this run on the
embedded model under the gate's own rules (prompt-clustered intervals, rounds of new seeds).

    python bench/pure_vs_uce.py [policies/demo.yaml] [--db sqlite:///bench.db]

The paraphrase probe of every embedded-world concept uses the dev split of its held-out prompts, whatever
the policy names: a benchmark compares settings, so it never sees the prompts that score a release.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from safeguard import apply_policy, probe_run, report_data
from safeguard.db import open_db
from safeguard.policy import parse_policy_text
from safeguard.world import concepts as C

KINDS = ["canonical", "paraphrase", "neighbours", "keep", "collateral", "selective_alignment"]


def dev_paraphrases_only(doc: dict, path: Path) -> dict:
    """The policy document with each embedded-world concept's paraphrases replaced by its dev split.

    A concept that is not a world concept keeps its own paraphrases, unless its file lies in the world's
    held-out folder outside the dev split, which stops the run."""
    by_name = {n.lower(): c for c in C.ALL for n in c.names}
    dev_dir = C.HELDOUT_DIR / "dev"
    for spec in doc.get("concepts") or []:
        concept = by_name.get(str(spec.get("name", "")).lower())
        if concept is not None and concept.has_heldout:
            spec.pop("paraphrases_file", None)
            spec["paraphrases"] = list(concept.dev_paraphrases)
        elif spec.get("paraphrases_file"):
            target = (path.parent / spec["paraphrases_file"]).resolve()
            if C.HELDOUT_DIR in target.parents and dev_dir not in target.parents:
                raise SystemExit(f"{path}: {spec['name']}'s paraphrases_file {spec['paraphrases_file']} is a held-out "
                                 f"file outside {dev_dir}; a benchmark may read the dev split only")
    return doc


def with_eraser(path: Path, eraser: str, params: dict, out: str):
    doc = dev_paraphrases_only(yaml.safe_load(path.read_text()), path)
    doc["eraser"] = {"name": eraser, "params": params}
    doc["output"] = {"dir": out}
    return parse_policy_text(yaml.safe_dump(doc, sort_keys=False), str(path))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("policy", nargs="?", default="policies/demo.yaml")
    ap.add_argument("--db", default=None)
    args = ap.parse_args(argv)
    path = Path(args.policy).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=Path.cwd()))
    db_url = args.db or f"sqlite:///{work}/bench.db"
    db = open_db(db_url)
    base = yaml.safe_load(path.read_text())["eraser"].get("params", {})
    rows = {}
    pure_params = {k: v for k, v in base.items() if k in ("tau", "tau_forget", "tau_retain", "steps", "seeds", "guidance_scale")}
    projection = {"tau_retain": 0.75, **{k: v for k, v in base.items() if k in ("steps", "seeds", "guidance_scale")}}
    for eraser, params in (("none", {}), ("uce", {}), ("pure", pure_params), ("retain_projection", projection)):
        loaded = with_eraser(path, eraser, params, str(work / f"edited-{eraser}"))
        t0 = time.perf_counter()
        outcome = apply_policy(loaded, db_url=db_url, echo=lambda m: None)
        edit_seconds = time.perf_counter() - t0
        probed = probe_run(db, outcome.run_id, kinds=KINDS, echo=lambda m: None)
        data = report_data(db, probed.run_id)
        rows[eraser] = {"edit_s": edit_seconds, "probes": {}}
        for concept in data["concepts"]:
            for p in concept["probes"]:
                rows[eraser]["probes"][(concept["name"], p["probe"])] = p
    names = {"retain_projection": "E=P_R"}
    print(f"{'concept':<20}{'probe':<20}" + "".join(f"{names.get(e, e):>12}" for e in rows) + f"{'UCE/PURE':>10}")
    keys = list(rows["pure"]["probes"])
    for key in keys:
        vals = [rows[e]["probes"].get(key, {}) for e in rows]
        metric = [(v.get("retention") if v.get("kind") == "keep" else v.get("rate")) for v in vals]
        ratio = (metric[1] / metric[2]) if metric[1] is not None and metric[2] else None
        print(f"{key[0]:<20}{key[1]:<20}" + "".join(f"{_cell(m, v):>12}" for m, v in zip(metric, vals))
              + f"{'-' if ratio is None else f'{ratio:.2f}':>10}")
    print("\ncollateral (held-out prompts of every world concept outside the policy): original -> edited recognition")
    groups = {e: {g["group"]: g for g in (rows[e]["probes"].get(("Outside the policy", "collateral"), {}).get("groups") or [])}
              for e in rows}
    print(f"{'concept':<20}{'original':>10}" + "".join(f"{names.get(e, e):>12}" for e in rows))
    for group in groups["none"]:
        cells = [groups[e].get(group) for e in rows]
        original = cells[0]["original"]["rate"] if cells[0] else None
        print(f"{group:<20}{'-' if original is None else f'{original:.2f}':>10}"
              + "".join(f"{'-' if c is None else c['edited']['rate']:>12.2f}" if c else f"{'-':>12}" for c in cells))
    for kind in ("canonical", "paraphrase"):
        mean = {e: _mean([p["rate"] for (c, k), p in rows[e]["probes"].items() if k == kind and p["rate"] is not None]) for e in rows}
        print(f"mean {kind} target proportion: " + ", ".join(f"{e} {m:.3f}" for e, m in mean.items())
              + (f"; UCE/PURE = {mean['uce'] / mean['pure']:.2f}" if mean["pure"] else "; PURE leaks nothing"))
    print("edit seconds: " + ", ".join(f"{e} {r['edit_s']:.1f}" for e, r in rows.items()) + " (includes loading and writing)")
    print("rates are target proportions for target probes and retention (edited / original) for keep probes")


def _cell(metric, probe) -> str:
    """The figure and the status letter the gate gave it (P pass, F fail, U unassessed or uninformative)."""
    if metric is None:
        return "-"
    return f"{metric:.3f} {(probe.get('status') or '?')[0].upper()}"


def _mean(values):
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    main()
