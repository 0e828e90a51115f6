"""Held-out paraphrases of the embedded world: a dev split for tuning and a test split for scoring releases.

The splits are disjoint, no held-out prompt names its concept or repeats a training caption, the benchmarks
read the dev split only (checked in their source and by running their prompt collection with the test files
unreadable), and the demo release policy scores its paraphrase probes on the test split. The shipped prompt
sets for real models are checked at the end.
"""
import builtins
import importlib.util
import io
import os
import re
from pathlib import Path

import pytest
import yaml

from safeguard.world import concepts as C
from safeguard.world.data import sample_scenes

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DEMO = ROOT / "policies" / "demo.yaml"
HELDOUT = [c for c in C.ALL if c.has_heldout]
TEST_DIR = C.HELDOUT_DIR / "test"


def norm(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def all_heldout() -> dict[str, set[str]]:
    """Normalised held-out prompt -> the files it is in."""
    out: dict[str, set[str]] = {}
    for concept in HELDOUT:
        for split in C.SPLITS:
            for p in concept.heldout(split):
                out.setdefault(norm(p), set()).add(f"{split}/{concept.key}.txt")
    return out


def possible_captions() -> set[str]:
    """Every caption safeguard.world.data.caption can write: names through the caption templates."""
    caps = set()
    for subject in C.SUBJECTS:
        for s in subject.names:
            caps.add(s)  # the empty scene's plain caption is the bare name
            caps.update(t.format(s=s) for t in C.SUBJECT_TEMPLATES)
            for style in C.STYLES:
                caps.update(t.format(s=s, st=st) for t in C.STYLE_TEMPLATES[style.key] for st in style.names)
    for style in C.STYLES:
        caps.update(t.format(st=st) for t in C.STYLE_ONLY_TEMPLATES[style.key] for st in style.names)
    return {norm(c) for c in caps}


# ---- the splits --------------------------------------------------------------------------------------
def test_every_heldout_concept_has_a_dev_and_a_test_split():
    assert {c.category for c in HELDOUT} == set(C.HELDOUT_CATEGORIES) and len(HELDOUT) == 14
    for concept in HELDOUT:
        dev, test = concept.dev_paraphrases, concept.test_paraphrases
        assert len(dev) == 10 and len(test) >= 14, (concept.key, len(dev), len(test))
        assert len({norm(p) for p in dev}) == len(dev) and len({norm(p) for p in test}) == len(test), concept.key
        assert concept.paraphrases == dev + test
    for concept in C.OBJECTS + (C.EMPTY,):
        assert concept.paraphrases == ()


def test_dev_and_test_are_disjoint_for_every_concept_and_across_concepts():
    for concept in HELDOUT:
        assert not {norm(p) for p in concept.dev_paraphrases} & {norm(p) for p in concept.test_paraphrases}, concept.key
    shared = {p: files for p, files in all_heldout().items() if len(files) > 1}
    assert not shared, shared


def test_split_files_are_the_only_copy():
    assert not list(C.HELDOUT_DIR.glob("*.txt")), "flat held-out files are left over; the splits live in dev/ and test/"
    for split in C.SPLITS:
        files = sorted(p.stem for p in (C.HELDOUT_DIR / split).glob("*.txt"))
        assert files == sorted(c.key for c in HELDOUT), split
        for concept in HELDOUT:
            assert C.heldout_file(concept.key, split).read_text().startswith("# held-out "), (split, concept.key)
    source = (ROOT / "safeguard" / "world" / "concepts.py").read_text()
    some = HELDOUT[0].test_paraphrases[0]
    assert some not in source, "concepts.py keeps a second copy of the held-out prompts"


def test_no_heldout_prompt_names_a_concept_or_is_a_training_caption():
    captions = possible_captions()
    # the enumeration above covers what training really writes
    assert {norm(c) for _, _, _, c in sample_scenes(40000, seed=1)} <= captions
    names = {c.key: [n.lower() for n in c.names] for c in HELDOUT}
    for concept in HELDOUT:
        for p in concept.paraphrases:
            low = p.lower()
            assert not [n for n in names[concept.key] if n in low], (concept.key, p)
            # nor a name of another banned-kind concept, which would steer the prompt elsewhere
            assert not [(k, n) for k, ns in names.items() for n in ns if n in low], (concept.key, p)
            assert norm(p) not in captions, (concept.key, p)


# ---- who reads which split ---------------------------------------------------------------------------
TEST_SPLIT_REFERENCES = [
    r"(?i)heldout\w*[/\\\"', ]+test",  # a path into the test folder, however it is joined
    r"\btest_paraphrases\b",
    r"\.paraphrases\b",  # dev and test together
    r"\bheldout\s*\(\s*['\"]test",
    r"\bsplit\s*=\s*['\"]test",
    r"\bread_heldout\b",
    r"\bheldout_file\b",
    r"\bSPLITS\b",
]


# Scripts that report fixed settings on the test split and choose nothing (bench/RESULTS.md is written from
# their run). Every other bench script sweeps or tunes, so it may only see the dev split.
REPORTING_SCRIPTS = {"erasure.py"}


def test_bench_sources_never_reference_the_test_split():
    sources = sorted(BENCH.rglob("*.py"))
    assert sources and REPORTING_SCRIPTS <= {p.name for p in sources}
    for path in sources:
        if path.name in REPORTING_SCRIPTS:
            continue
        text = path.read_text()
        for pattern in TEST_SPLIT_REFERENCES:
            hit = re.search(pattern, text)
            assert hit is None, f"{path.relative_to(ROOT)} reads held-out prompts other than the dev split: {hit.group(0)!r}"


@pytest.fixture
def test_split_unreadable(monkeypatch):
    """Every way Python opens a file raises PermissionError for the test split's files, as a chmod would for
    a user who may not read them (the tests may run as root, where a chmod does not stop reads)."""
    def blocked(file) -> bool:
        if isinstance(file, int):
            return False
        p = Path(os.path.abspath(os.fsdecode(file)))
        return p == TEST_DIR or TEST_DIR in p.parents

    real_open, real_os_open = io.open, os.open

    def guarded_open(file, *args, **kwargs):
        if blocked(file):
            raise PermissionError(13, "Permission denied", os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    def guarded_os_open(file, *args, **kwargs):
        if blocked(file):
            raise PermissionError(13, "Permission denied", os.fsdecode(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    with pytest.raises(PermissionError):
        C.BY_KEY["pikachu"].test_paraphrases  # the block works on the way concepts.py reads
    with pytest.raises(PermissionError):
        C.BY_KEY["pikachu"].paraphrases


def load_bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_sweep_collects_its_prompts_without_the_test_split(test_split_unreadable):
    from safeguard.engine import make_plan
    from safeguard.policy import load_policy

    sets = load_bench("pure_settings").prompt_sets(make_plan(load_policy(DEMO)).request)
    assert len(sets) == 1 + len(load_policy(DEMO).policy.concepts)
    for name, s in sets.items():
        if name == "objects":
            continue
        assert s["paraphrase"] and set(s["paraphrase"]) <= set(s["concept"].dev_paraphrases), name


def test_pure_vs_uce_probes_dev_paraphrases_whatever_the_policy_names(tmp_path, test_split_unreadable):
    bench = load_bench("pure_vs_uce")
    loaded = bench.with_eraser(DEMO, "none", {}, str(tmp_path / "edited"))
    by_name = {n: c for c in C.ALL for n in c.names}
    for spec in loaded.policy.concepts:
        concept = by_name[spec.name]
        assert loaded.paraphrases(spec) == concept.dev_paraphrases, spec.name


def test_pure_vs_uce_refuses_a_heldout_file_outside_dev(tmp_path):
    bench = load_bench("pure_vs_uce")
    policy = tmp_path / "p.yaml"
    doc = {"concepts": [{"name": "a made-up style", "category": "style",
                         "paraphrases_file": str(C.heldout_file("van_gogh", "test"))}]}
    with pytest.raises(SystemExit, match="dev split only"):
        bench.dev_paraphrases_only(doc, policy)


# ---- the release policy --------------------------------------------------------------------------------
def test_demo_policy_scores_paraphrases_on_the_test_split():
    """Reads policies/demo.yaml as it is now: every paraphrases_file must lie in heldout/test/ and no
    anchor the edit is computed from may be a held-out prompt."""
    from safeguard.policy import load_policy

    doc = yaml.safe_load(DEMO.read_text())
    files = [(spec["name"], spec["paraphrases_file"]) for spec in doc["concepts"] if spec.get("paraphrases_file")]
    assert files, "the demo policy has no paraphrases_file"
    for name, rel in files:
        path = (DEMO.parent / rel).resolve()
        assert path.parent == TEST_DIR and path.is_file(), f"{name}: paraphrases_file {rel} is not a file in {TEST_DIR}"
    loaded = load_policy(DEMO)
    heldout = all_heldout()
    for spec in loaded.policy.concepts:
        anchors = list(spec.expanded_forget_anchors()) + [p for n in spec.neighbours for p in spec.neighbour_prompts(n)]
        shared = {a: heldout[norm(a)] for a in anchors if norm(a) in heldout}
        assert not shared, (spec.name, shared)



# ---- prompt sets for real models ---------------------------------------------------------------------
def test_general_prompts_and_companion_objects():
    from safeguard.prompts import companion_objects, general_prompts

    banned = [n.lower() for c in HELDOUT for n in c.names]
    for prompts, minimum in ((general_prompts(), 300), (companion_objects(), 40)):
        assert len(prompts) >= minimum
        assert len({norm(p) for p in prompts}) == len(prompts), "duplicates"
        for p in prompts:
            assert p == p.strip() and p and len(p) <= 200 and "\n" not in p, p
            assert not [n for n in banned if re.search(rf"\b{re.escape(n)}\b", p.lower())], p
    assert all(re.match(r"^(a|an) ", o) for o in companion_objects())
