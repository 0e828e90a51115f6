"""The `safeguard` command line: a thin click layer over plain functions."""
from __future__ import annotations

import json
import sys

import click

from . import __version__, runtime
from .errors import PluginError, SafeguardError

DB_OPTION = click.option("--db", "db_url", envvar="SAFEGUARD_DB", show_envvar=True, default=None,
                         help="SQLAlchemy URL of the audit database [default: sqlite:///.safeguard/audit.db].")


def _fail(exc: SafeguardError):
    click.echo(f"Error: {exc.one_line()}", err=True)
    sys.exit(1)


def _fail_unexpected(exc: Exception, ctx: click.Context):
    command = " ".join(["safeguard", *ctx.command_path.split()[1:]])
    click.echo(f"Error: {runtime.describe_error(exc, command)}", err=True)
    sys.exit(1)


# --- global options: how models run and how much is shown --------------------------------------------------
# Given before the command (`safeguard --device cpu apply ...`) or after it (`safeguard apply ... --device
# cpu`); the group sets every setting on each invocation, a command only those given on its command line.
def _setting(name: str, convert=lambda value: value):
    def callback(ctx, param, value):
        if ctx.resilient_parsing:
            return
        if isinstance(ctx.command, click.Group) or ctx.get_parameter_source(param.name) is click.core.ParameterSource.COMMANDLINE:
            try:
                runtime.configure(**{name: convert(value)})
            except SafeguardError as exc:
                raise click.BadParameter(exc.message + (f" ({exc.fix})" if exc.fix else ""), ctx=ctx, param=param) from None
    return callback


def _global_options(*, command: bool) -> list[click.Option]:
    env = (lambda name: None) if command else (lambda name: name)
    common = dict(expose_value=False, hidden=command, show_envvar=not command)
    return [
        click.Option(["--device"], default="auto", show_default=True, metavar="auto|cpu|cuda[:N]|mps",
                     envvar=env("SAFEGUARD_DEVICE"), callback=_setting("device"),
                     help="Where models run; auto: CUDA, else MPS, else the CPU.", **common),
        click.Option(["--dtype"], default="auto", show_default=True, type=click.Choice(runtime.DTYPES),
                     envvar=env("SAFEGUARD_DTYPE"), callback=_setting("dtype"),
                     help="Compute dtype; auto: float32 on the CPU, the model files' dtype on an accelerator. "
                          "Edited models are written in the dtype their input files had.", **common),
        click.Option(["--cpu-offload"], is_flag=True, envvar=env("SAFEGUARD_CPU_OFFLOAD"), callback=_setting("cpu_offload"),
                     help="Keep models in CPU memory and move each to the accelerator while it runs "
                          "(diffusers' model CPU offload; needs accelerate).", **common),
        click.Option(["--attention-slicing"], is_flag=True, envvar=env("SAFEGUARD_ATTENTION_SLICING"),
                     callback=_setting("attention_slicing"),
                     help="Compute attention in slices to save accelerator memory (diffusers' attention slicing).", **common),
        click.Option(["-v", "--verbose"], count=True, callback=_setting("verbosity"),
                     help="Show the model libraries' logs, warnings and progress bars (-vv: their info logs too).", **common),
        click.Option(["-q", "--quiet"], is_flag=True, callback=_setting("quiet"),
                     help="No progress display on stderr (it is off anyway when stderr is not a terminal).", **common),
        click.Option(["--progress"], is_flag=True, envvar=env("SAFEGUARD_PROGRESS"), callback=_setting("progress"),
                     help="Show the progress display (counts, elapsed, ETA) even when stderr is not a terminal or CI is "
                          "set: a line every 10 s, for logs.", **common),
        click.Option(["--debug"], is_flag=True, envvar=env("SAFEGUARD_DEBUG"), callback=_setting("debug"),
                     help="Show the full traceback of unexpected errors instead of one line.", **common),
    ]


class _Command(click.Command):
    """Prints SafeguardError as one line (exit 1) instead of a traceback, and any other error as one line
    naming what failed and a fix (the traceback with --debug). Accepts the global options too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.extend(_global_options(command=True))

    def invoke(self, ctx):
        try:
            with runtime.library_warnings():
                return super().invoke(ctx)
        except SafeguardError as exc:
            if runtime.current().debug and isinstance(exc, PluginError) and exc.__cause__ is not None:
                raise
            _fail(exc)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if runtime.current().debug:
                raise
            _fail_unexpected(exc, ctx)


class _Group(click.Group):
    command_class = _Command
    group_class = type


class _RootGroup(_Group):
    """The ``safeguard`` group: a plugin that failed to load is reported here, as one line (exit 1), once the
    global options are parsed (--debug: the traceback)."""
    plugin_error: PluginError | None = None

    def invoke(self, ctx):
        if self.plugin_error is not None:
            if runtime.current().debug:
                raise self.plugin_error
            _fail(self.plugin_error)
        return super().invoke(ctx)


def _with_global_options(group: click.Group) -> click.Group:
    group.params.extend(_global_options(command=False))
    return group


@_with_global_options
@click.group(cls=_RootGroup)
@click.version_option(__version__, "--version", prog_name="safeguard")
def cli():
    """Erase banned concepts from text-to-image models, prove it, record it and gate releases on it."""


@cli.command()
@click.argument("policy_file", type=click.Path(dir_okay=False))
def validate(policy_file):
    """Check a policy file and print what it bans."""
    from .engine import make_plan
    from .policy import load_policy

    loaded = load_policy(policy_file)
    plan = make_plan(loaded)
    p = loaded.policy
    click.echo(f"{policy_file}: valid (policy {p.name!r}, version {p.version}, sha256 {loaded.sha256[:12]})")
    click.echo(f"  model: {p.model.source}; eraser: {p.eraser.name} {json.dumps(plan.params.model_dump(mode='json'))}")
    for c in plan.request.concepts:
        click.echo(f"  ban {c.name!r} ({c.category}): {len(c.forget_prompts)} forget anchors, {len(c.retain_prompts)} neighbour anchors")
    click.echo(f"  keep: {len(p.keep)} prompts; output: {plan.out_dir}")


@cli.command()
@click.argument("policy_file", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Output folder (overrides output.dir).")
@DB_OPTION
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; load and write nothing.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin/.ckpt) weights. They can run code when loaded.")
@click.option("--lora", is_flag=True, default=None, help="Also write the edit as a LoRA adapter in OUT/lora (output.lora).")
@click.option("--single-file", is_flag=True, default=None,
              help="Also write the edited model as one OUT/<name>.safetensors in the original layout (output.single_file; SD1.x).")
def apply(policy_file, out_dir, db_url, dry_run, allow_pickle, lora, single_file):
    """Erase the policy's banned concepts and write the edited model."""
    from .engine import apply_policy
    from .policy import load_policy

    loaded = load_policy(policy_file)
    outcome = apply_policy(loaded, out_dir=out_dir, db_url=db_url, dry_run=dry_run, allow_pickle=allow_pickle,
                           lora=lora, single_file=single_file, echo=lambda m: click.echo(m, err=True))
    if dry_run:
        plan = outcome.plan
        click.echo(f"dry run: would erase {', '.join(c.name for c in plan.request.concepts)} with {plan.eraser_cls.name} "
                   f"and write {plan.out_dir}")
        return
    _print_apply_summary(outcome)


def _print_apply_summary(outcome):
    stats = outcome.stats
    click.echo(f"run {outcome.run_id}: wrote {outcome.out_dir}")
    if "seconds" in stats:
        click.echo(f"  edit took {stats['seconds']:.2f}s over {len(outcome.layers)} cross-attention layers")
    if stats.get("reduces_to") == "retain_projection":
        click.echo(f"  PURE with these thresholds reduces to a projection onto the retain span in "
                   f"{stats.get('layers_reduced_to_retain_projection', 0)}/{len(outcome.layers)} layers; "
                   "this edit is not PURE")
    if stats.get("forget_energy_removed") is not None:
        retain = stats.get("retain_energy_removed")
        click.echo(f"  E removes {stats['forget_energy_removed']:.1%} of the forget anchors' activation energy"
                   + (f" and {retain:.1%} of the retain anchors'" if retain is not None else "") + " (mean over layers)")
    for layer in outcome.layers:
        s = layer.stats
        if "rank_retain" in s:
            forget = f"rank F {s['rank_forget']}, " if "rank_forget" in s else ""
            projection = " (retain projection)" if s.get("operator") == "retain_projection" else ""
            click.echo(f"  {layer.module}: {forget}rank R {s['rank_retain']}, "
                       f"|dWk| {s.get('delta_norm_k', 0):.3f}, |dWv| {s.get('delta_norm_v', 0):.3f}{projection}")


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Where to write the restored model.")
@DB_OPTION
def revert(model_dir, out_dir, db_url):
    """Undo the last edit of a model written by `safeguard apply` (recorded as a revert run)."""
    from .stages.revert import revert_model

    reverted = revert_model(model_dir, out_dir, db_url=db_url)
    click.echo(f"run {reverted.run_id}: restored the original tensors into {reverted.out_dir}")
    click.echo(f"  model {reverted.input_tree_sha256[:12]} -> {reverted.output_tree_sha256[:12]}"
               + (f" (undoes apply run {reverted.reverted_run_id})" if reverted.reverted_run_id else ""))


@cli.group(cls=_Group)
def runs():
    """Inspect recorded runs."""


@runs.command("list")
@DB_OPTION
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def runs_list(db_url, limit, as_json):
    """List recent runs, newest first."""
    from .db import open_db

    rows = open_db(db_url).list_runs(limit)
    if as_json:
        click.echo(json.dumps({"schema_version": 1, "runs": rows}, indent=2, default=str))
        return
    for r in rows:
        click.echo(f"{r['id']}  {r['kind']:<6} {r['status']:<8} {r['started_at']}  {r.get('policy_name') or ''}")


@runs.command("show")
@click.argument("run_id")
@DB_OPTION
@click.option("--json", "as_json", is_flag=True)
def runs_show(run_id, db_url, as_json):
    """Everything recorded about one run."""
    from .db import open_db

    data = open_db(db_url).run_as_dict(run_id)
    if as_json:
        click.echo(json.dumps({"schema_version": 1, **data}, indent=2, default=str))
        return
    run = data["run"]
    click.echo(f"run {run['id']} ({run['kind']}, {run['status']}) started {run['started_at']} by {run.get('user')}@{run.get('host')}")
    click.echo(f"  policy {run.get('policy_name')} sha256 {run.get('policy_sha256')}")
    click.echo(f"  eraser {run.get('eraser_name')} {run.get('eraser_version')} params {json.dumps(run.get('eraser_params'))}")
    for c in data.get("concept_edits", []):
        click.echo(f"  concept {c['concept']} ({c['category']}): {len(c['forget_prompts'])} forget, {len(c['retain_prompts'])} retain prompts")
    click.echo(f"  {len(data.get('layer_edits', []))} layers edited; {len(data.get('probe_results', []))} probe results")
    if run.get("error"):
        click.echo(f"  error: {run['error']}")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def plugins(as_json):
    """List installed plugins (does not import torch)."""
    from .plugins import plugin_info

    info = plugin_info(include_builtin=True)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for p in info:
        click.echo(f"{p['name']} {p['version'] or ''} {'(built-in) ' if p['builtin'] else ''}{', '.join(p['hooks'])}")


@cli.command("probe")
@click.argument("run_id")
@DB_OPTION
@click.option("--resume", is_flag=True, help="RUN_ID is a probe run: continue it without redoing recorded samples.")
@click.option("--only", "kinds", multiple=True, help="Run only these probe kinds (repeatable).")
def probe_cmd(run_id, db_url, resume, kinds):
    """Probe the edited model of an apply run for leakage and record every sample."""
    from .distributed import team
    from .stages.probe import probe_run

    launch = team()  # under `accelerate launch`, the processes share the samples; the main one speaks and writes
    result = probe_run(launch.open_db(db_url), run_id, resume=resume, kinds=list(kinds) or None,
                       echo=(lambda m: click.echo(m, err=True)) if launch.is_main else (lambda m: None))
    if launch.is_main:
        shared = f" by {launch.size} processes" if launch.size > 1 else ""
        click.echo(f"probe run {result.run_id} (of apply run {result.apply_run_id}){shared}; evidence in {result.evidence_dir}")


@cli.command("report")
@click.argument("run_id")
@DB_OPTION
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the HTML report here.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the report data as JSON.")
@click.option("--markdown", "md_out", type=click.Path(dir_okay=False), default=None, help="Also write a Markdown summary.")
@click.option("--blur-unsafe", is_flag=True, help="Blur images of concepts in the 'unsafe' category.")
def report_cmd(run_id, db_url, output, json_out, md_out, blur_unsafe):
    """Build the compliance report from the database (nothing is re-run)."""
    from .db import open_db
    from .stages.report import report_run

    report = report_run(open_db(db_url), run_id, html=output, json=json_out, markdown=md_out, blur_unsafe=blur_unsafe)
    click.echo(f"{report.verdict.upper()}: wrote {', '.join(map(str, report.written))}")


def _gate_help() -> str:
    from .gate import exit_codes_text

    return f"Record the gate's verdict on a probed run and exit with its code: {exit_codes_text()}."


@cli.command("gate", help=_gate_help())
@click.argument("run_id")
@DB_OPTION
@click.option("--junit", type=click.Path(dir_okay=False), default=None, help="Write the verdict as JUnit XML.")
def gate_cmd(run_id, db_url, junit):
    from .db import open_db
    from .stages.gate import gate_run

    decision, _ = gate_run(open_db(db_url), run_id, junit=junit, echo=lambda m: click.echo(m, err=True))
    _print_decision(decision)
    sys.exit(int(decision.exit_code))


def _print_decision(decision) -> None:
    click.echo(decision.line())
    for reason in decision.reasons:
        click.echo(f"  - {reason}")


class _AuditGroup(_Group):
    """`safeguard audit POLICY` runs the whole job; `safeguard audit verify|export` inspect the trail."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@cli.group("audit", cls=_AuditGroup)
def audit_group():
    """Apply + probe + report + gate in one go (`audit POLICY`), or verify/export the audit trail."""


@audit_group.command("run")
@click.argument("policy_file", type=click.Path(dir_okay=False))
@DB_OPTION
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None)
@click.option("-o", "--report", "report_path", type=click.Path(dir_okay=False), default=None, help="HTML report path.")
@click.option("--blur-unsafe", is_flag=True)
@click.option("--junit", type=click.Path(dir_okay=False), default=None)
@click.option("--lora", is_flag=True, default=None, help="Also write the edit as a LoRA adapter in OUT/lora (output.lora).")
@click.option("--single-file", is_flag=True, default=None,
              help="Also write the edited model as one OUT/<name>.safetensors in the original layout (output.single_file; SD1.x).")
def audit_run(policy_file, db_url, out_dir, report_path, blur_unsafe, junit, lora, single_file):
    """Apply POLICY_FILE, probe the result, write the report and exit with the gate's code."""
    from .policy import load_policy
    from .stages.audit import audit_policy

    from .distributed import team

    main = team().is_main
    audited = audit_policy(load_policy(policy_file), db_url=db_url, out_dir=out_dir, report_path=report_path,
                           blur_unsafe=blur_unsafe, junit=junit, lora=lora, single_file=single_file,
                           echo=(lambda m: click.echo(m, err=True)) if main else (lambda m: None))
    if audited is None:  # another process of a launch: the main process prints and exits with the gate's code
        return
    _print_apply_summary(audited.applied)
    click.echo(f"probe run {audited.probed.run_id}; report {audited.html_report}")
    for c in audited.report.data["concepts"]:
        for p in c["probes"]:
            o = p.get("original") or {}
            rate = "n/a" if p["rate"] is None else f"{p['rate']:.2f}"
            before = "n/a" if o.get("rate") is None else f"{o['rate']:.2f}"
            click.echo(f"  {c['name']:<16} {p['probe']:<12} {p['status']:<10} original {before} -> edited {rate} (n={p['n']})")
    _print_decision(audited.decision)
    sys.exit(int(audited.decision.exit_code))


@audit_group.command("verify")
@DB_OPTION
@click.option("--public-key", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Also check the signed chain head in the database against this ed25519 public key file.")
def audit_verify(db_url, public_key):
    """Recompute the audit hash chain and report the first broken link."""
    from .integrity import verify_chain
    from .db import open_db
    from .export import read_key_file

    key = read_key_file(public_key) if public_key else None
    result = verify_chain(open_db(db_url), public_key=key)
    if result.ok:
        signed = f", {result.signatures_checked} signed head(s) verified" if key else ""
        click.echo(f"OK: {result.checked} audit events, chain intact{signed}")
        return
    click.echo(f"BROKEN at event {result.first_broken_seq}: {result.reason} ({result.checked} events checked)")
    sys.exit(1)


@audit_group.command("keygen")
@click.option("--out", "key_file", type=click.Path(dir_okay=False), required=True,
              help="Private key file to create (mode 0600); the public key goes to KEYFILE.pub.")
def audit_keygen(key_file):
    """Create an ed25519 key pair for signing the audit chain head."""
    from .export import write_key_pair

    kid, private_path, public_path = write_key_pair(key_file)
    click.echo(f"key {kid}: private key {private_path} (keep it secret), public key {public_path}")


@audit_group.command("sign")
@DB_OPTION
@click.option("--key", "key_file", type=click.Path(dir_okay=False, exists=True), required=True,
              help="ed25519 private key file (from 'audit keygen').")
def audit_sign(db_url, key_file):
    """Verify the chain, sign its head and record the signature in the chain."""
    from .integrity import sign_head
    from .db import open_db
    from .export import read_key_file

    head = sign_head(open_db(db_url), read_key_file(key_file))
    click.echo(f"signed head seq {head['seq']} {head['row_hash']} with key {head['key_id']}")


@audit_group.command("export")
@click.argument("run_id")
@DB_OPTION
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Bundle folder to create.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Also sign the chain head with this ed25519 private key file.")
def audit_export(run_id, db_url, out_dir, key_file):
    """Write an evidence bundle for RUN_ID: reports, policy, hashes, environment, chain and manifest."""
    from .db import open_db
    from .export import export_bundle, read_key_file

    key = read_key_file(key_file) if key_file else None
    bundle = export_bundle(open_db(db_url), run_id, out_dir, key_bytes=key)
    click.echo(f"wrote evidence bundle {bundle}")


def _register_plugin_commands():
    from .plugins import call_hook

    try:
        call_hook("register_commands", cli=cli)
    except PluginError as exc:
        cli.plugin_error = exc


_register_plugin_commands()
