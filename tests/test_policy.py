"""Policy loading: valid files load and hash canonically; every kind of bad input gives one clear line."""
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from safeguard.errors import PolicyError
from safeguard.policy import load_policy, parse_policy_text

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """\
version: 1
name: t
model:
  source: embedded:world-v1
concepts:
  - name: Pikachu
    category: character
    neighbours: [Mario]
"""


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return path


def test_shipped_policies_load():
    for name in ("demo.yaml", "reference-sd15.yaml"):
        loaded = load_policy(ROOT / "policies" / name)
        assert loaded.policy.version == 1
        assert len(loaded.sha256) == 64


def test_defaults_expand_anchors_and_neighbours(tmp_path):
    loaded = load_policy(write(tmp_path, MINIMAL))
    concept = loaded.policy.concepts[0]
    assert "a picture of Pikachu" in concept.expanded_forget_anchors()
    assert "a picture of Mario" in concept.neighbour_prompts("Mario")


def test_canonical_hash_ignores_formatting_and_comments(tmp_path):
    a = load_policy(write(tmp_path, MINIMAL, "a.yaml"))
    b = load_policy(write(tmp_path, "# a comment\n" + MINIMAL.replace("[Mario]", "\n      - Mario"), "b.yaml"))
    assert a.sha256 == b.sha256
    assert a.text_sha256 != b.text_sha256


BAD = {
    "malformed yaml": ("version: 1\nname: [unclosed\n", "not valid YAML", None),
    "not a mapping": ("- just\n- a list\n", "must be a YAML mapping", None),
    "unknown top-level field": (MINIMAL + "colour: blue\n", "colour", "remove it"),
    "unknown concept field": (MINIMAL + "    paraphrase: [x]\n", "concepts[0].paraphrase", "remove it"),
    "wrong type": (MINIMAL.replace("version: 1", "version: one"), "version", None),
    "newer version": (MINIMAL.replace("version: 1", "version: 7"), "newer", "upgrade safeguard"),
    "missing model": (MINIMAL.replace("model:\n  source: embedded:world-v1\n", ""), "model", "add this field"),
    "bad category": (MINIMAL.replace("character", "cartoon"), "concepts[0].category", "allowed values"),
    "no concepts": (MINIMAL.split("concepts:")[0] + "concepts: []\n", "at least one concept", None),
    "duplicate concepts": (MINIMAL + "  - name: pikachu\n    category: character\n", "listed twice", None),
    "empty anchors": (MINIMAL + "    forget_anchors: []\n", "empty anchor list", None),
    "empty prompt": (MINIMAL + "    paraphrases: ['  ']\n", "non-empty", None),
    "huge prompt": (MINIMAL + "    paraphrases: ['" + "x" * 3000 + "']\n", "limit is 2000", None),
    "template without slot": (MINIMAL + "    templates: ['a photo']\n", "exactly once", None),
    "tau outside range": (MINIMAL + "probes:\n  steps: 0\n", "probes.steps", "larger"),
    "negative threshold": (MINIMAL + "thresholds:\n  max_leakage: -0.1\n", "thresholds.max_leakage", "larger"),
    "neighbour also banned": (MINIMAL + "  - name: Mario\n    category: character\n", "also bans", None),
    "no generic labels": (MINIMAL + "judge:\n  generic_labels: []\n", "generic label", None),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_policies_give_one_clear_line(tmp_path, case):
    text, must_contain, fix = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    line = info.value.one_line()
    assert "\n" not in line
    assert str(path) in line
    assert must_contain in line
    if fix:
        assert fix in line


def test_error_names_the_line(tmp_path):
    path = write(tmp_path, MINIMAL + "probes:\n  images_per_prompt: 0\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.line == 10
    assert f"{path}:10: probes.images_per_prompt" in info.value.one_line()


def test_non_utf8_missing_and_folder(tmp_path):
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(write(tmp_path, b"version: 1\nname: \xff\xfe\n"))
    with pytest.raises(PolicyError, match="no such file"):
        load_policy(tmp_path / "absent.yaml")
    with pytest.raises(PolicyError, match="is a folder"):
        load_policy(tmp_path)


def test_paths_outside_allowed_roots_are_refused(tmp_path, monkeypatch):
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    monkeypatch.chdir(policy_dir)
    loaded = load_policy(write(policy_dir, MINIMAL + "    paraphrases_file: /etc/hostname\n"))
    with pytest.raises(PolicyError, match="outside the allowed folders") as info:
        loaded.paraphrases(loaded.policy.concepts[0])
    assert "SAFEGUARD_ALLOWED_PATHS" in info.value.one_line()


def test_prompt_files_txt_csv_and_bad_bytes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("# comment\nfirst\n\nsecond\n")
    (tmp_path / "p.csv").write_text("id,prompt\n1,alpha\n2,beta\n")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\n")
    loaded = load_policy(write(tmp_path, MINIMAL + "    paraphrases_file: p.txt\n"))
    assert loaded.paraphrases(loaded.policy.concepts[0]) == ("first", "second")
    loaded = load_policy(write(tmp_path, MINIMAL + "    paraphrases_file: p.csv\n"))
    assert loaded.paraphrases(loaded.policy.concepts[0]) == ("alpha", "beta")
    loaded = load_policy(write(tmp_path, MINIMAL + "    paraphrases_file: bad.txt\n"))
    with pytest.raises(PolicyError, match="not UTF-8"):
        loaded.paraphrases(loaded.policy.concepts[0])


# Arbitrary YAML-ish documents and random mutations of a valid policy: the loader either accepts them or
# raises PolicyError with a one-line message; nothing else escapes.
yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30))
yaml_values = st.recursive(yaml_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                                st.dictionaries(st.text(max_size=12), kids, max_size=4)),
                           max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=yaml_values)
def test_fuzz_arbitrary_documents(doc):
    text = yaml.safe_dump(doc)
    try:
        parse_policy_text(text, "fuzz.yaml")
    except PolicyError as exc:
        assert "\n" not in exc.one_line() and exc.one_line().startswith("fuzz.yaml")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.lists(st.sampled_from(["version", "name", "model", "source", "concepts", 0, "name", "category",
                                      "neighbours", "probes", "steps", "eraser", "params"]), min_size=1, max_size=3),
       value=yaml_values)
def test_fuzz_mutated_valid_policy(path, value):
    doc = yaml.safe_load(MINIMAL)
    node = doc
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            break
    last = path[-1]
    if isinstance(node, dict):
        node[str(last)] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    try:
        parse_policy_text(yaml.safe_dump(doc), "fuzz.yaml")
    except PolicyError as exc:
        assert "\n" not in exc.one_line()


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200))
def test_fuzz_raw_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "p.yaml"
    path.write_bytes(raw)
    try:
        load_policy(path)
    except PolicyError as exc:
        assert "\n" not in exc.one_line()
