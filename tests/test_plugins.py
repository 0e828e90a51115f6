"""The plugin contract: every hook documented and exercised, classes checked against their protocols, plugin
failures as one line naming the plugin, and a third-party package discovered through its entry point."""
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel

import safeguard
from safeguard import contracts, hookimpl, hookspecs, plugins
from safeguard.errors import PluginError
from safeguard.plugins import get_erasers, get_judges, get_probes, pm

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "safeguard-reference-judge"
HOOKS = sorted(name for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "safeguard_spec"))


@contextmanager
def registered(name, **hooks):
    """A plugin module named ``name`` implementing ``hooks`` (hook name -> function), registered for the block."""
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        function.__name__ = hook
        setattr(module, hook, hookimpl(function))
    pm.register(module, name=name)
    try:
        yield module
    finally:
        pm.unregister(name=name)


class _Params(BaseModel):
    strength: float = 1.0


class ValidEraser:
    name, version, Params = "valid", "1", _Params

    def erase(self, pipe, request, params):
        return contracts.EraseResult(layers=[], originals={}, stats={"strength": params.strength})


class ValidProbe:
    name, kind = "valid_probe", "target"

    def cases(self, ctx, concept):
        return contracts.ProbeCases(ctx.target_cases(concept, [f"a photo of {concept.name}"]))


class ValidJudge:
    name, version = "valid_judge", "1"

    def __init__(self, checkpoint, template=None, base_dir=None):
        self.sha256 = checkpoint

    def label_text(self, label, category):
        return label

    def classify(self, images, label_texts):
        raise NotImplementedError

    def image_features(self, images):
        raise NotImplementedError


# --- hooks: documented and exercised --------------------------------------------------------------------------
def test_hooks_are_the_documented_ones():
    assert HOOKS == ["register_commands", "register_erasers", "register_judges", "register_probes"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_docstring_naming_its_parameters(hook):
    function = getattr(hookspecs, hook)
    doc = inspect.getdoc(function)
    assert doc and len(doc.splitlines()) == 1, f"{hook}: one-line docstring"
    for parameter in inspect.signature(function).parameters:
        assert f"``{parameter}``" in doc, f"{hook}'s docstring does not describe {parameter!r}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_in_docs_plugins_md(hook):
    text = (ROOT / "docs" / "plugins.md").read_text()
    signature = f"{hook}({', '.join(inspect.signature(getattr(hookspecs, hook)).parameters)})"
    assert f"### `{signature}`" in text, f"docs/plugins.md has no section '### `{signature}`'"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    assert f"test_hook_{hook}" in globals(), f"tests/test_plugins.py has no test_hook_{hook}"


def test_hook_register_erasers():
    from safeguard.engine import erase_with_plugin, Plan

    def register_erasers(register):
        register(ValidEraser)

    with registered("third-party-eraser", register_erasers=register_erasers):
        erasers = get_erasers()
        assert erasers["valid"] is ValidEraser and "pure" in erasers
        assert plugins.registered_by(ValidEraser) == "third-party-eraser"
        request = contracts.EraseRequest(concepts=[], keep_prompts=[])
        result = erase_with_plugin(Plan(ValidEraser, _Params(strength=0.5), request, Path(".")), pipe=None)
        assert result.stats == {"strength": 0.5}
    assert "valid" not in get_erasers()


def test_hook_register_probes():
    from safeguard.policy import parse_policy_text
    from fixtures import tiny_policy_text

    def register_probes(register):
        register(ValidProbe)

    loaded = parse_policy_text(tiny_policy_text("probe-hook"), "policy.yaml")
    with registered("third-party-probe", register_probes=register_probes):
        probe = get_probes()["valid_probe"]
        ctx = contracts.ProbeContext(loaded, None, None, ValidJudge("x"))
        cases = probe().cases(ctx, loaded.policy.concepts[0])
        assert [c.prompt for c in cases.cases] == ["a photo of pikachu"]
        assert cases.cases[0].expected == loaded.policy.concepts[0].label
    assert "valid_probe" not in get_probes()


def test_hook_register_judges():
    def register_judges(register):
        register(ValidJudge)

    with registered("third-party-judge", register_judges=register_judges):
        judge = get_judges()["valid_judge"]("weights.bin")
        assert judge.sha256 == "weights.bin" and judge.label_text("cat", "object") == "cat"
    assert "valid_judge" not in get_judges()


def test_hook_register_commands():
    from safeguard.cli import cli

    def register_commands(cli):
        @cli.command()
        @click.argument("who")
        def greet(who):
            """Say hello."""
            click.echo(f"hello {who}")

    with registered("third-party-command", register_commands=register_commands):
        try:
            plugins.call_hook("register_commands", cli=cli)
            result = CliRunner().invoke(cli, ["greet", "world"], catch_exceptions=False)
            assert result.exit_code == 0 and result.output == "hello world\n"
        finally:
            cli.commands.pop("greet", None)


# --- contracts --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, getter", [("eraser", get_erasers), ("probe", get_probes), ("judge", get_judges)])
def test_builtins_meet_their_contracts(kind, getter):
    found = getter()
    assert found
    for name, cls in found.items():
        assert contracts.contract_gaps(kind, cls) == [], name


def test_contracts_are_exported_and_import_no_torch():
    for name in ("Eraser", "Probe", "Judge", "EraseRequest", "EraseResult", "ProbeCase", "ProbeCases", "ProbeContext"):
        assert getattr(safeguard, name) is getattr(contracts, name)
    code = "import sys, safeguard.contracts, safeguard.plugins; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_eraser_whose_erase_is_a_classmethod_is_refused():
    class ClassEraser:
        name, version, Params = "class_eraser", "1", _Params

        @classmethod
        def erase(cls, pipe, request, params):
            pass

    def register_erasers(register):
        register(ClassEraser)

    with registered("bad-eraser", register_erasers=register_erasers), pytest.raises(PluginError) as caught:
        get_erasers()
    assert caught.value.one_line() == (
        "plugin 'bad-eraser' registers eraser test_an_eraser_whose_erase_is_a_classmethod_is_refused.<locals>."
        "ClassEraser, which lacks erase(self, pipe, request, params) as an instance method (it is a classmethod) "
        "(fix: implement the Eraser contract of safeguard/contracts.py (docs/plugins.md))")


def test_a_judge_missing_methods_is_refused_naming_each_gap():
    class HalfJudge:
        name = "half"

        def label_text(self, label):
            return label

    assert contracts.contract_gaps("judge", HalfJudge) == [
        "a non-empty str attribute 'version'",
        "label_text(self, label, category) taking 2 arguments (it is label_text(self, label))",
        "a method classify(self, images, label_texts)",
        "a method image_features(self, images)",
        "an __init__(self, checkpoint, template, base_dir) accepting the policy's judge settings",
    ]

    def register_judges(register):
        register(HalfJudge)

    with registered("half-judge", register_judges=register_judges), pytest.raises(PluginError, match="^plugin 'half-judge' registers judge"):
        get_judges()


def test_a_probe_with_an_unknown_kind_is_refused():
    class OddProbe:
        name, kind = "odd", "leakage"

        def cases(self, ctx, concept):
            pass

    assert contracts.contract_gaps("probe", OddProbe) == ["a 'kind' attribute, one of target, keep, screen (got 'leakage')"]


def test_two_plugins_registering_one_name_are_named():
    class Twin(ValidEraser):
        pass

    with registered("first", register_erasers=lambda register: register(ValidEraser)), \
            registered("second", register_erasers=lambda register: register(Twin)), \
            pytest.raises(PluginError) as caught:
        get_erasers()
    assert "plugins 'first' and 'second' both register an eraser named 'valid'" in caught.value.message


def test_a_plugin_that_raises_while_registering_is_one_line_naming_it():
    from safeguard.cli import cli, _register_plugin_commands

    def register_commands(cli):
        raise KeyError("missing setting")

    with registered("raising-plugin", register_commands=register_commands):
        try:
            _register_plugin_commands()
            result = CliRunner().invoke(cli, ["plugins"])
            assert result.exit_code == 1
            assert result.output == ("Error: plugin 'raising-plugin' raised in register_commands: KeyError: "
                                     "'missing setting' (fix: fix or uninstall raising-plugin; --debug shows "
                                     "the traceback)\n")
            debug = CliRunner().invoke(cli, ["--debug", "plugins"])
            assert isinstance(debug.exception, PluginError) and isinstance(debug.exception.__cause__, KeyError)
        finally:
            cli.plugin_error = None


def test_a_builtin_that_fails_to_import_is_an_error(monkeypatch):
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "DEFAULT_PLUGINS", (*plugins.DEFAULT_PLUGINS, "safeguard.builtin.no_such_eraser"))
    with pytest.raises(PluginError) as caught:
        plugins.load_plugins()
    assert caught.value.one_line() == (
        "built-in plugin safeguard.builtin.no_such_eraser failed to import: ModuleNotFoundError: No module named "
        "'safeguard.builtin.no_such_eraser' (fix: reinstall safeguard (pip install -e . in a checkout))")


# --- a third-party package, from outside --------------------------------------------------------------------
def _child_env(site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEGUARD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    """The example plugin pip-installed into a folder of its own (no network, no dependencies)."""
    work = tmp_path_factory.mktemp("example-plugin")
    source = work / "source"
    shutil.copytree(EXAMPLE, source)  # the build writes build/ and *.egg-info beside the sources
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(source)], check=True, capture_output=True, text=True)
    return site


def test_the_example_plugin_is_discovered_through_its_entry_point(example_site, tmp_path):
    listed = subprocess.run([sys.executable, "-m", "safeguard", "plugins", "--json"], capture_output=True,
                            text=True, env=_child_env(example_site), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    entry = next((p for p in json.loads(listed.stdout) if p["name"] == "reference_judge"), None)
    assert entry == {"name": "reference_judge", "version": "0.1.0", "builtin": False, "hooks": ["register_judges"],
                     "distribution": "safeguard-reference-judge"}
    restricted = subprocess.run([sys.executable, "-m", "safeguard", "plugins", "--json"], capture_output=True,
                                text=True, env={**_child_env(example_site), "SAFEGUARD_LOAD_PLUGINS": ""}, cwd=tmp_path)
    assert "reference_judge" not in {p["name"] for p in json.loads(restricted.stdout)}


def test_the_example_judge_labels_images_by_their_references(example_site, tmp_path):
    from PIL import Image

    for label, colour in (("red square", (220, 30, 30)), ("blue square", (30, 30, 220))):
        (tmp_path / "refs" / label).mkdir(parents=True)
        image = Image.new("RGB", (32, 32), "white")
        image.paste(colour, (8, 8, 24, 24))
        image.save(tmp_path / "refs" / label / "0.png")
    code = """
import json, sys
from PIL import Image
from safeguard.plugins import get_judges
judge = get_judges()["reference_images"]("refs", None, None)
red = Image.new("RGB", (64, 64), "white"); red.paste((200, 40, 40), (16, 16, 48, 48))
probs, features = judge.classify([red], ["blue square", "red square", "no references"])
print(json.dumps({"probs": probs.tolist(), "sha256": judge.sha256, "dim": features.shape[1]}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(example_site),
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    blue, red, unknown = seen["probs"][0]
    assert red > 0.99 and unknown == 0.0 and abs(blue + red - 1) < 1e-9
    assert re.fullmatch(r"[0-9a-f]{64}", seen["sha256"]) and seen["dim"] == 16 * 16 * 3


def test_core_never_imports_a_plugin_module():
    """Dependencies point one way: plugins use the core, the core reaches plugins only through the manager."""
    offenders = []
    for path in sorted((ROOT / "safeguard").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "safeguard.builtin" in line and path.name != "plugins.py":
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
    listed = [line for line in (ROOT / "safeguard" / "plugins.py").read_text().splitlines() if "safeguard.builtin" in line]
    assert [line.strip().strip('",') for line in listed] == list(plugins.DEFAULT_PLUGINS)
