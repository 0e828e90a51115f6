"""docs/ci.md: its GitHub Actions workflow and GitLab CI job parse, run safeguard commands and options that
exist, publish the JUnit file the gate writes and keep the HTML report it writes."""
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from safeguard.cli import cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "ci.md"


def yaml_blocks() -> dict[str, dict]:
    """The doc's ```yaml blocks, by the heading of their section."""
    blocks, heading = {}, None
    for part in re.split(r"^(## .+)$", DOC.read_text(), flags=re.M):
        if part.startswith("## "):
            heading = part[3:].strip()
            continue
        for block in re.findall(r"^```yaml\n(.*?)^```", part, flags=re.M | re.S):
            blocks[heading] = yaml.safe_load(block)
    return blocks


def github_runs(workflow: dict) -> list[str]:
    return [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]


def gitlab_runs(job: dict) -> list[str]:
    return [*job["script"], *job.get("after_script", [])]


def safeguard_commands(runs: list[str]) -> list[list[str]]:
    lines = [line.strip() for run in runs for line in run.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("safeguard ")]


def resolve(args: list[str]) -> tuple[click.Command, list[str]]:
    """The command ``safeguard ARGS`` runs and the words left for it, as the CLI parses them."""
    command, words = cli, list(args)
    while isinstance(command, click.Group):
        global_words = []
        while words and words[0].startswith("-"):
            global_words.append(words.pop(0))
        assert_options(command, global_words)
        ctx = click.Context(command)
        name = words[0] if words else None
        if name not in command.commands and command.name == "audit":
            name, words = "run", ["run", *words]  # `safeguard audit POLICY` is `safeguard audit run POLICY`
        sub = command.get_command(ctx, name) if name else None
        assert sub is not None, f"safeguard has no command {' '.join(args[:len(args) - len(words) + 1])!r}"
        command, words = sub, words[1:]
    return command, words


def assert_options(command: click.Command, words: list[str]) -> None:
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in words:
        if word.startswith("-"):
            assert word.split("=")[0] in known, f"{command.name} has no option {word}"


def option_value(command: click.Command, words: list[str], option: str):
    param = next(p for p in command.params if option in p.opts)
    for i, word in enumerate(words):
        if word in param.opts:
            return words[i + 1]
    return None


@pytest.fixture(scope="module")
def blocks():
    found = yaml_blocks()
    assert set(found) >= {"GitHub Actions", "GitLab CI"}
    return found


def test_github_workflow_runs_the_gate_on_a_release_and_keeps_its_files(blocks):
    workflow = blocks["GitHub Actions"]
    # PyYAML reads the key `on` as True (YAML 1.1); GitHub reads it as the trigger.
    triggers = workflow.get("on", workflow.get(True))
    assert "published" in triggers["release"]["types"]
    steps = [s for job in workflow["jobs"].values() for s in job["steps"]]
    junit, report = check_audit_commands(github_runs(workflow))
    published = next(s for s in steps if "junit-report" in s.get("uses", ""))
    assert published["with"]["report_paths"] == junit and published["if"] == "always()"
    kept = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert kept["if"] == "always()"
    paths = kept["with"]["path"].split()
    assert report in paths and junit in paths and str(Path(report).with_suffix(".md")) in paths


def test_gitlab_job_runs_the_gate_on_a_release_tag_and_keeps_its_files(blocks):
    (job,) = blocks["GitLab CI"].values()
    assert job["rules"] == [{"if": "$CI_COMMIT_TAG"}]
    junit, report = check_audit_commands(gitlab_runs(job))
    artifacts = job["artifacts"]
    assert artifacts["when"] == "always" and artifacts["reports"]["junit"] == junit
    assert report in artifacts["paths"] and junit in artifacts["paths"]
    assert str(Path(report).with_suffix(".md")) in artifacts["paths"]


def check_audit_commands(runs: list[str]) -> tuple[str, str]:
    """Every safeguard command of a job exists with its options; returns the audit's JUnit and report paths."""
    commands = safeguard_commands(runs)
    assert commands, "the job runs no safeguard command"
    audited = None
    for args in commands:
        command, words = resolve(args)
        assert_options(command, words)
        if command.name == "run" and command.callback.__name__ == "audit_run":
            audited = (option_value(command, words, "--junit"), option_value(command, words, "--report"))
    assert audited and all(audited), "the job never runs `safeguard audit POLICY -o REPORT --junit JUNIT`"
    return audited


def test_every_command_quoted_in_the_doc_exists():
    quoted = [shlex.split(code)[1:] for code in re.findall(r"`(safeguard [^`]+)`", DOC.read_text())]
    assert len(quoted) >= 5
    for args in quoted:
        command, words = resolve(args)
        assert_options(command, words)


def test_the_checker_refuses_commands_and_options_that_do_not_exist():
    with pytest.raises(AssertionError, match="no command 'deploy'"):
        resolve(["deploy", "now"])
    command, words = resolve(["gate", "RUN", "--xml", "x"])
    with pytest.raises(AssertionError, match="gate has no option --xml"):
        assert_options(command, words)
