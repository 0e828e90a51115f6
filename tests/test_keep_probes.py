"""Probes of what must survive (neighbours, keep, collateral, selective alignment) on tiny pipelines, and the
sequential sampling loop that renders rounds of new seeds until a probe decides."""
import pytest

import standin_plugins
from safeguard.errors import PolicyError
from safeguard.plugins import get_probes
from safeguard.policy import parse_policy_text
from safeguard.probing import POLICY_SCOPE, ProbeContext, run_probe, summarise, rule_for

POLICY = """\
version: 1
name: keep-probes
model: {{source: {source}}}
concepts:
  - name: pikachu
    category: character
    forget_anchors: [a photo of pikachu, pikachu in a garden]
    neighbours: [mario]
keep: [a photo of a cat, a picture of a tree]
collateral:
  prompts: {prompts}
  max_general: 6
probes: {{images_per_prompt: 1, steps: 2, max_prompts: 3, max_images: {max_images}, seed: 1000}}
thresholds: {{min_elicitation: 0.0, max_leakage: 0.8}}
judge: {{name: never-target, checkpoint: none}}
"""


def context(tiny_pipe, tmp_path, source="model", prompts="[]", max_images=64):
    loaded = parse_policy_text(POLICY.format(source=source, prompts=prompts, max_images=max_images),
                               str(tmp_path / "policy.yaml"))
    return ProbeContext(loaded, tiny_pipe("sd1"), tiny_pipe("sd1"), standin_plugins.NeverTargetJudge("none"), seed=0)


def test_neighbours_and_keep_probes_use_the_policys_prompts(tiny_pipe, tmp_path):
    ctx = context(tiny_pipe, tmp_path)
    concept = ctx.policy.policy.concepts[0]
    neighbours = get_probes()["neighbours"]().cases(ctx, concept).cases
    assert {c.expected for c in neighbours} == {"mario"} and all("mario" in c.prompt for c in neighbours)
    keep = get_probes()["keep"]().cases(ctx, concept).cases
    assert [c.prompt for c in keep] == ["a photo of a cat", "a picture of a tree"]


def test_collateral_prompts_are_held_out_from_everything_the_eraser_saw(tiny_pipe, tmp_path):
    from safeguard.prompts import general_prompts

    ctx = context(tiny_pipe, tmp_path, prompts="[a dog on a beach]")
    probe = get_probes()["collateral"]
    assert probe.scope == "policy" and probe.kind == "keep"
    cases = probe().cases(ctx, None).cases
    seen = ctx.policy.eraser_prompts()
    assert cases and not {c.prompt for c in cases} & seen
    assert {c.group for c in cases} == {"policy prompts", "general prompts"}
    general = [c for c in cases if c.group == "general prompts"]
    assert len(general) == 6 and all(c.prompt in general_prompts() for c in general)
    for case in cases:  # each image must be told apart from other prompts of the set
        assert case.expected == case.prompt and case.labels[0] == case.prompt and len(case.labels) >= 8
    with pytest.raises(PolicyError, match="collateral prompt 'a photo of a cat' is also given to the eraser"):
        probe().cases(context(tiny_pipe, tmp_path, prompts="[a photo of a cat]"), None)


def test_world_collateral_covers_every_concept_the_policy_does_not_ban(tiny_pipe, tmp_path):
    from safeguard.world import concepts as C

    ctx = context(tiny_pipe, tmp_path, source="embedded:world-v1")
    ctx.policy.policy.concepts[0].__dict__  # the tiny policy bans "pikachu", which is a world concept
    cases = get_probes()["collateral"]().cases(ctx, None).cases
    groups = {c.group for c in cases}
    expected = {c.name for c in C.ALL if c.key not in ("pikachu", "empty")}
    assert groups == expected
    assert all("pikachu" not in c.prompt.lower() for c in cases)
    assert not {c.prompt for c in cases} & ctx.policy.eraser_prompts()


def test_selective_alignment_pairs_the_banned_concept_with_something_kept(tiny_pipe, tmp_path):
    ctx = context(tiny_pipe, tmp_path)
    cases = get_probes()["selective_alignment"]().cases(ctx, ctx.policy.policy.concepts[0]).cases
    assert cases and all(c.prompt.startswith("pikachu next to ") and c.prompt.endswith(c.expected) for c in cases)
    world = context(tiny_pipe, tmp_path, source="embedded:world-v1")
    styled = get_probes()["selective_alignment"]().cases(world, world.policy.policy.concepts[0]).cases
    assert styled and all("pikachu" in c.prompt.lower() and c.category == "style" for c in styled)


class _Recorder:
    """The part of the audit database run_probe uses, in memory."""

    def __init__(self):
        self.rows = []

    def samples(self, run_id):
        return list(self.rows)

    def add_samples(self, run_id, rows):
        self.rows += rows


def test_sampling_stops_once_the_probe_decides(tiny_pipe, tmp_path):
    ctx = context(tiny_pipe, tmp_path, max_images=64)
    db, probe = _Recorder(), get_probes()["canonical"]
    concept = ctx.policy.policy.concepts[0]
    outcome = run_probe(ctx, db, "run", concept, probe, tmp_path, echo=lambda m: None)
    edited = [s for s in db.rows if s["model_role"] == "edited"]
    plan = outcome.details["plan"][0]
    # Two prompts, one new seed each per round, 32 planned rounds (z = 3.4): a judge that never sees the
    # concept shows leakage <= 0.8 after two rounds (upper bound 0.74 on 4 images), and sampling stops there.
    assert outcome.status == "measured" and plan["looks"] == 32 and plan["looks_used"] == 2 and len(edited) == 4
    row = summarise(outcome, db.rows, rule_for(ctx.policy.policy, probe, concept), ctx.judge)
    assert row["status"] == "pass" and row["details"]["decision"]["looks"] == 32


def test_sampling_continues_in_new_seeds_until_the_budget_when_undecided(tiny_pipe, tmp_path):
    ctx = context(tiny_pipe, tmp_path, max_images=8)
    ctx.policy.policy.thresholds.__dict__["max_leakage"] = 0.05  # zero hits in 2 prompts cannot show <= 0.05
    db, probe = _Recorder(), get_probes()["canonical"]
    concept = ctx.policy.policy.concepts[0]
    outcome = run_probe(ctx, db, "run", concept, probe, tmp_path, echo=lambda m: None)
    seeds = sorted({s["seed"] for s in db.rows})
    assert seeds == [1000, 1001, 1002, 1003] and outcome.details["plan"][0]["looks_used"] == 4
    row = summarise(outcome, db.rows, rule_for(ctx.policy.policy, probe, concept), ctx.judge)
    assert row["status"] == "unassessed" and "cannot show leakage" in row["details"]["error"]
    assert all(s["scores"]["group"] is None for s in db.rows)
    assert POLICY_SCOPE == "*"
