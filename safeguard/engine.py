"""`apply`: validate the plan, erase every banned concept in one edit, write the model, record the run."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from .erasers import ConceptRequest, EraseRequest, edit_bases
from .errors import PolicyError
from .faults import crash_point
from .policy import LoadedPolicy


@dataclass
class Plan:
    eraser_cls: type
    params: object
    request: EraseRequest
    out_dir: Path


@dataclass
class ApplyOutcome:
    run_id: str | None
    out_dir: Path | None
    stats: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    plan: Plan | None = None


def _neighbour_prompts(loaded: LoadedPolicy, concept) -> list[str]:
    return [p for n in concept.neighbours for p in concept.neighbour_prompts(n)]


def _write_lora(pipe, name: str, result, folder: Path, run_id: str, loaded: LoadedPolicy, echo) -> dict:
    """The edit as a LoRA adapter in ``folder/lora``; returns the edit record's ``lora`` entry."""
    from . import lora

    adapter = lora.edit_adapter(getattr(pipe, name), result.originals, name, edit_bases(result.artefacts))
    summary = lora.write_adapter(adapter, folder / lora.LORA_DIR,
                                 metadata={"safeguard_run": run_id, "policy_sha256": loaded.sha256})
    echo(f"LoRA adapter: {summary['modules']} projections, rank {summary['max_rank']} at most, "
         f"{summary['bytes'] / 1e6:.2f} MB in {lora.LORA_DIR}/")
    return {"lora": summary}


def _write_single_file(pipe, folder: Path, stem: str, run_id: str, loaded: LoadedPolicy, echo) -> dict:
    """The edited model as one ``folder/<stem>.safetensors`` in its input's dtypes; returns the record entry."""
    import torch

    from . import singlefile

    stored = getattr(pipe, "_safeguard_stored", None)
    dtypes = {name: getattr(torch, dtype) for name, dtype in (stored.dtypes if stored else {}).items()}
    summary = singlefile.write_single_file(pipe, folder / f"{stem}.safetensors", dtypes,
                                           metadata={"safeguard_run": run_id, "policy_sha256": loaded.sha256})
    echo(f"single-file checkpoint: {summary['file']} ({summary['bytes'] / 1e6:.1f} MB)")
    return {"single_file": summary}


def make_plan(loaded: LoadedPolicy, out_dir: str | None = None) -> Plan:
    """Everything `apply` will do, checked before any model is loaded."""
    from .plugins import get_erasers

    policy = loaded.policy
    erasers = get_erasers()
    if policy.eraser.name not in erasers:
        raise PolicyError(f"unknown eraser {policy.eraser.name!r}", file=str(loaded.path), field="eraser.name",
                          fix=f"use one of: {', '.join(sorted(erasers))} (see 'safeguard plugins')")
    eraser_cls = erasers[policy.eraser.name]
    try:
        params = eraser_cls.Params.model_validate(policy.eraser.params)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise PolicyError(err["msg"].removeprefix("Value error, "), file=str(loaded.path),
                          field=f"eraser.params.{where}" if where else "eraser.params",
                          fix=f"see the {policy.eraser.name} eraser's parameters in 'safeguard plugins --json'") from None
    concepts = [ConceptRequest(name=c.name, category=c.category, forget_prompts=list(c.expanded_forget_anchors()),
                               retain_prompts=_neighbour_prompts(loaded, c)) for c in policy.concepts]
    request = EraseRequest(concepts=concepts, keep_prompts=list(policy.keep), seed=policy.eraser.seed)
    target = loaded.resolve(out_dir or policy.output.dir, "output.dir") if out_dir is None else Path(out_dir).resolve()
    return Plan(eraser_cls, params, request, target)


def apply_policy(loaded: LoadedPolicy, *, out_dir: str | None = None, db_url: str | None = None,
                 dry_run: bool = False, allow_pickle: bool = False, lora: bool | None = None,
                 single_file: bool | None = None, echo=print) -> ApplyOutcome:
    """Apply the policy's edit and write the edited model; ``lora`` (default: ``output.lora``) also writes it
    as a LoRA adapter in ``<output>/lora``, ``single_file`` (default: ``output.single_file``) as one
    ``<output>/<output name>.safetensors`` in the original layout."""
    from . import modelio
    from .db import open_db
    from .provenance import argv

    plan = make_plan(loaded, out_dir)
    policy = loaded.policy
    if dry_run:
        return ApplyOutcome(None, None, plan=plan)

    from .singlefile import source_and_config

    source, config = source_and_config(loaded)  # config: the local config folder of a single-file checkpoint
    if isinstance(source, Path) and config is None:
        modelio.check_model_folder(source, allow_pickle or policy.model.allow_pickle)
    db = open_db(db_url)
    db.mark_stale_running_runs_failed()  # runs whose process was killed show as failed, not running forever
    parent_record = modelio.read_edit_record(source) if isinstance(source, Path) else None
    run_id = db.start_run(kind="apply", policy=loaded, argv=argv(),
                          eraser_name=plan.eraser_cls.name, eraser_version=plan.eraser_cls.version,
                          eraser_params=plan.params.model_dump(mode="json"), seed=plan.request.seed,
                          parent_run_id=(parent_record or {}).get("run_id"))
    crash_point("apply:after-run-row")
    try:
        modelio.clean_partial_outputs(plan.out_dir)
        t0 = time.perf_counter()
        if isinstance(source, Path):
            input_files = modelio.hash_model_folder(source) if config is None else modelio.hash_single_file(source, config)
            input_model_id = db.record_model(str(source), policy.model.revision, "input", input_files.files, input_files.tree_sha256)
        else:
            input_files, input_model_id = None, db.record_model(source, policy.model.revision, "input", [], None)
        pipe = modelio.load_pipeline(source, policy.model.revision, allow_pickle or policy.model.allow_pickle, config=config)
        crash_point("apply:after-load")
        from .attention import check_editable, denoiser_of

        check_editable(denoiser_of(pipe))  # MMDiT (SD3, Flux): one line saying why, before any capture
        want_lora = policy.output.lora if lora is None else lora
        if want_lora:
            from . import lora as lora_export

            lora_export.check_exportable(pipe)
        want_single_file = policy.output.single_file if single_file is None else single_file
        if want_single_file:
            from . import singlefile

            singlefile.check_exportable(pipe)
        echo(f"loaded {policy.model.source} in {time.perf_counter() - t0:.1f}s; erasing {len(plan.request.concepts)} concept(s) with {plan.eraser_cls.name}")
        result = erase_with_plugin(plan, pipe)
        crash_point("apply:after-edit")
        name = modelio.denoiser_name(pipe)
        lineage = list((parent_record or {}).get("lineage", []))
        lineage.append({"run_id": run_id, "policy": policy.name, "policy_sha256": loaded.sha256,
                        "eraser": plan.eraser_cls.name, "input_tree_sha256": input_files.tree_sha256 if input_files else None,
                        "concepts": [c.name for c in plan.request.concepts]})
        record = {"run_id": run_id, "policy": policy.name, "policy_sha256": loaded.sha256, "eraser": plan.eraser_cls.name,
                  "eraser_version": plan.eraser_cls.version, "eraser_params": plan.params.model_dump(mode="json"),
                  "eraser_defaults_evidence": getattr(plan.eraser_cls, "defaults_evidence", None),
                  "source": str(policy.model.source), "concepts": [c.name for c in plan.request.concepts],
                  "edited_modules": [layer.module for layer in result.layers], "lineage": lineage}
        from . import modelcard

        hub_id = None if config is not None or isinstance(modelio.resolve_source(policy.model.source, loaded.base_dir, cache=False), Path) \
            else policy.model.source
        record["base_model"] = modelcard.base_model_info(str(policy.model.source), config or (source if isinstance(source, Path) else None),
                                                         hub_id)
        extra_outputs = []
        if want_lora:
            extra_outputs.append(lambda folder: _write_lora(pipe, name, result, folder, run_id, loaded, echo))
        if want_single_file:
            extra_outputs.append(lambda folder: _write_single_file(pipe, folder, plan.out_dir.name, run_id, loaded, echo))
        # Last, so it describes every other output; "not yet probed" until a gate records a verdict.
        extra_outputs.append(lambda folder: modelcard.write_card(folder, modelcard.card_text(record, policy)) and None)
        modelio.write_pipeline_atomically(pipe, plan.out_dir, originals=result.originals, record=record, denoiser_name=name,
                                          bases=edit_bases(result.artefacts), extra_outputs=extra_outputs)
        for output in ("lora", "single_file"):
            if output in record:
                result.stats[output] = record[output]  # in the run's stats, so the audit trail holds it
        crash_point("apply:after-rename")
        output_files = modelio.hash_model_folder(plan.out_dir)
        with db.session() as s:
            output_model_id = db.record_model(str(plan.out_dir), None, "output", output_files.files, output_files.tree_sha256, session=s)
            db.add_concept_edits(run_id, [{"concept": c.name, "category": c.category, "forget_prompts": c.forget_prompts,
                                           "retain_prompts": c.retain_prompts, "stats": result.stats.get("concepts", {}).get(c.name, {})}
                                          for c in plan.request.concepts], session=s)
            db.add_layer_edits(run_id, [{"module": layer.module, "stats": layer.stats} for layer in result.layers], session=s)
            db.finish_run(run_id, "done", stats=result.stats, input_model_id=input_model_id,
                          output_model_id=output_model_id, session=s)
        return ApplyOutcome(run_id, plan.out_dir, result.stats, result.layers, plan)
    except BaseException as exc:
        db.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise


def erase_with_plugin(plan: Plan, pipe):
    """Run the plan's eraser on ``pipe``; an unexpected error inside it is reported naming the plugin."""
    from . import runtime
    from .plugins import registered_by

    plugin = registered_by(plan.eraser_cls) or plan.eraser_cls.__module__
    with runtime.phase(f"the {plan.eraser_cls.name!r} eraser (plugin {plugin})",
                       fix=f"run again with --debug for the traceback, and report it to the authors of {plugin}"):
        return plan.eraser_cls().erase(pipe, plan.request, plan.params)

