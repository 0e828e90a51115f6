"""PURE against the UCE baseline on the same policy: leakage on canonical and held-out paraphrase prompts,
retention of neighbours, and edit time, all measured in this run on the embedded model.

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

from safeguard.db import open_db
from safeguard.engine import apply_policy
from safeguard.evidence import probe, report_data
from safeguard.policy import parse_policy_text
from safeguard.world import concepts as C

KINDS = ["canonical", "paraphrase", "neighbours", "keep"]


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
    for eraser, params in (("none", {}), ("uce", {}), ("pure", base)):
        loaded = with_eraser(path, eraser, params, str(work / f"edited-{eraser}"))
        t0 = time.perf_counter()
        outcome = apply_policy(loaded, db_url=db_url, echo=lambda m: None)
        edit_seconds = time.perf_counter() - t0
        probed = probe(db, outcome.run_id, kinds=KINDS, echo=lambda m: None)
        data = report_data(db, probed.run_id)
        rows[eraser] = {"edit_s": edit_seconds, "probes": {}}
        for concept in data["concepts"]:
            for p in concept["probes"]:
                rows[eraser]["probes"][(concept["name"], p["probe"])] = p
    print(f"{'concept':<16}{'probe':<12}" + "".join(f"{e:>10}" for e in rows) + f"{'UCE/PURE':>10}")
    keys = list(rows["pure"]["probes"])
    for key in keys:
        vals = [rows[e]["probes"].get(key, {}) for e in rows]
        metric = [(v.get("retention") if v.get("kind") == "keep" else v.get("rate")) for v in vals]
        ratio = (metric[1] / metric[2]) if metric[1] is not None and metric[2] else None
        print(f"{key[0]:<16}{key[1]:<12}" + "".join(f"{'-' if m is None else f'{m:.3f}':>10}" for m in metric)
              + f"{'-' if ratio is None else f'{ratio:.2f}':>10}")
    for kind in ("canonical", "paraphrase"):
        mean = {e: _mean([p["rate"] for (c, k), p in rows[e]["probes"].items() if k == kind and p["rate"] is not None]) for e in rows}
        print(f"mean {kind} target proportion: " + ", ".join(f"{e} {m:.3f}" for e, m in mean.items())
              + (f"; UCE/PURE = {mean['uce'] / mean['pure']:.2f}" if mean["pure"] else "; PURE leaks nothing"))
    print("edit seconds: " + ", ".join(f"{e} {r['edit_s']:.1f}" for e, r in rows.items()) + " (includes loading and writing)")
    print("rates are target proportions for target probes and retention (edited / original) for keep probes")


def _mean(values):
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    main()
