"""Single-file checkpoints, the form A1111 and ComfyUI use: loading them, and writing an edited model as one.

Loading goes through diffusers' own ``from_single_file`` with a local config folder (``model.config``: a
diffusers folder of the same architecture; its configs, tokenizers and scheduler are read, its weights are not
needed), ``local_files_only``, so nothing is fetched.

Writing covers Stable Diffusion 1.x pipelines (``UNet2DConditionModel`` + ``AutoencoderKL`` + a CLIP text
encoder). The installed diffusers converts original (LDM) checkpoints to diffusers but not back, so the
reverse key mapping is ours; the round-trip test loads what it writes with ``from_single_file`` and checks
every weight. Top-level layers come from diffusers' ``DIFFUSERS_TO_LDM_MAPPING``; the blocks map as follows
(``L`` = ``layers_per_block``, ``n`` = number of blocks):

U-Net, under ``model.diffusion_model.``
    ``down_blocks.i.resnets.j``           -> ``input_blocks.{1 + i(L+1) + j}.0``
    ``down_blocks.i.attentions.j``        -> ``input_blocks.{1 + i(L+1) + j}.1``
    ``down_blocks.i.downsamplers.0.conv`` -> ``input_blocks.{(i+1)(L+1)}.0.op``
    ``mid_block.resnets.0 / attentions.0 / resnets.1`` -> ``middle_block.0 / 1 / 2``
    ``up_blocks.i.resnets.j``             -> ``output_blocks.{i(L+1) + j}.0``
    ``up_blocks.i.attentions.j``          -> ``output_blocks.{i(L+1) + j}.1``
    ``up_blocks.i.upsamplers.0.conv``     -> ``output_blocks.{i(L+1) + L}.{1, or 2 after attention}.conv``
    in a resnet: ``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut`` ->
    ``in_layers.0, in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection``;
    inside an attention (transformer) block the names are the same in both forms.
VAE, under ``first_stage_model.``
    ``encoder.down_blocks.i.resnets.j`` -> ``encoder.down.i.block.j``; ``...downsamplers.0.conv`` -> ``...downsample.conv``
    ``decoder.up_blocks.i.resnets.j``   -> ``decoder.up.{n-1-i}.block.j``; ``...upsamplers.0.conv`` -> ``...upsample.conv``
    ``mid_block.resnets.0 / 1`` -> ``mid.block_1 / block_2``; ``mid_block.attentions.0`` -> ``mid.attn_1`` with
    ``group_norm, to_q, to_k, to_v, to_out.0`` -> ``norm, q, k, v, proj_out`` (1x1 convolutions there: [C, C, 1, 1]);
    in a resnet ``conv_shortcut`` -> ``nin_shortcut``.
Text encoder: ``cond_stage_model.transformer.text_model.`` + the CLIP text model's keys (transformers 5 names them
without ``text_model.``, transformers 4 with it).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import ModelError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
FORMAT = "Stable Diffusion 1.x single file (original LDM keys)"

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def is_single_file(source: str | Path) -> bool:
    return str(source).lower().endswith(SINGLE_FILE_SUFFIXES) and not Path(str(source)).is_dir()


# ----------------------------------------------------------------------------------------------- loading
def source_and_config(loaded) -> tuple[Path | str, Path | None]:
    """The policy's model: ``(checkpoint file, config folder)`` for a single-file checkpoint, else
    ``(folder or hub id, None)`` (:func:`safeguard.modelio.resolve_source`). Paths are relative to the policy."""
    import os

    from .errors import PolicyError
    from .modelio import resolve_source

    spec = loaded.policy.model
    relative = lambda value: Path(value).expanduser() if os.path.isabs(os.path.expanduser(value)) else loaded.base_dir / value  # noqa: E731
    if not is_single_file(spec.source):
        if spec.config is not None:
            raise PolicyError("model.config is for single-file checkpoints, and model.source is not one", file=str(loaded.path),
                              field="model.config", fix="remove model.config, or point model.source at the .safetensors file")
        return resolve_source(spec.source, loaded.base_dir, spec.revision), None
    if spec.config is None:
        raise PolicyError("a single-file checkpoint needs a config folder to be loaded with", file=str(loaded.path),
                          field="model.config",
                          fix="set model.config to a local diffusers folder of the same architecture (its weights are not needed)")
    return relative(spec.source).resolve(), relative(spec.config).resolve()


def check_config_folder(config: Path, checkpoint: Path) -> str:
    """The pipeline class named by a single file's config folder; one-line errors for a missing or bad one."""
    index = Path(config) / "model_index.json"
    if not Path(config).is_dir() or not index.exists():
        raise ModelError("the config folder of a single-file checkpoint must be a diffusers folder with model_index.json",
                         file=str(config), field="model.config",
                         fix="point model.config at a diffusers folder of the same architecture (weights are not needed)")
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError, UnicodeDecodeError):
        raise ModelError("model_index.json names no pipeline class (_class_name)", file=str(index), field="model.config",
                         fix="use a folder written by save_pretrained()") from None
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise ModelError(f"diffusers cannot load {class_name} from a single file", file=str(checkpoint), field="model.source",
                         fix="convert the checkpoint to a diffusers folder and point model.source at it")
    return class_name


def load_single_file(checkpoint: Path, config: Path, *, dtype, allow_pickle: bool = False):
    """``<PipelineClass>.from_single_file(checkpoint, config=config, local_files_only=True)`` in ``dtype``."""
    import diffusers

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ModelError("the single-file checkpoint does not exist", file=str(checkpoint), field="model.source",
                         fix="check the path")
    if checkpoint.suffix.lower() != ".safetensors" and not allow_pickle:
        raise ModelError(f"{checkpoint.suffix} checkpoints are pickles, which can run code when loaded", file=str(checkpoint),
                         field="model.allow_pickle",
                         fix="convert it to .safetensors, or set model.allow_pickle: true (or --allow-pickle) if you trust it")
    cls = getattr(diffusers, check_config_folder(config, checkpoint))
    from .modelio import _dtype_keyword

    try:
        return cls.from_single_file(str(checkpoint), config=str(config), local_files_only=True,
                                    **{_dtype_keyword(): dtype})
    except ModelError:
        raise
    except Exception as exc:  # diffusers' conversion and safetensors errors
        text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        raise ModelError(f"cannot load the single-file checkpoint with this config folder ({text})", file=str(checkpoint),
                         field="model.config",
                         fix="model.config must describe the checkpoint's architecture (SD1.x, SD2.x, SDXL, ...)") from None


def single_file_inputs(checkpoint: Path, config: Path) -> tuple[Path, list[Path]]:
    """The files a single-file model consists of (the checkpoint and the config folder's files), with the folder
    they are recorded relative to."""
    import os

    checkpoint, config = Path(checkpoint).resolve(), Path(config).resolve()
    files = [checkpoint] + sorted(p for p in config.rglob("*") if p.is_file() and not p.name.startswith("."))
    base = Path(os.path.commonpath([str(p.parent) for p in files]))
    return base, files


# ----------------------------------------------------------------------------------------------- writing
def check_exportable(pipe) -> None:
    """Refuse, before the edit, a pipeline the SD1.x single-file layout cannot hold."""
    problem = _unsupported(pipe)
    if problem:
        raise ModelError(f"single-file export covers Stable Diffusion 1.x pipelines, and {problem}", field="output.single_file",
                         fix="set output.single_file: false (the diffusers folder and the LoRA adapter work for every model)")


def _unsupported(pipe) -> str | None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet, vae, text = getattr(pipe, "unet", None), getattr(pipe, "vae", None), getattr(pipe, "text_encoder", None)
    if getattr(pipe, "text_encoder_2", None) is not None:
        return f"{type(pipe).__name__} has two text encoders"
    if not isinstance(unet, UNet2DConditionModel):
        return f"this denoiser is a {type(unet or getattr(pipe, 'transformer', None)).__name__}"
    if not isinstance(vae, AutoencoderKL):
        return f"this VAE is a {type(vae).__name__}"
    if type(text) is not CLIPTextModel:
        return f"this text encoder is a {type(text).__name__}, not CLIPTextModel"
    config = unet.config
    if not isinstance(config.layers_per_block, int):
        return "this U-Net has a different number of layers per block"
    if config.addition_embed_type or config.class_embed_type or config.encoder_hid_dim_type:
        return "this U-Net has extra embeddings"
    if config.mid_block_type not in (None, "UNetMidBlock2DCrossAttn"):
        return f"this U-Net's mid block is {config.mid_block_type}"
    if not set(config.down_block_types) <= {"CrossAttnDownBlock2D", "DownBlock2D"} or \
            not set(config.up_block_types) <= {"CrossAttnUpBlock2D", "UpBlock2D"}:
        return "this U-Net has other block types"
    return None


def _unet_key(key: str, layers: int, up_attention: set[int], top: dict[str, str]) -> str:
    if key in top:
        return top[key]
    step = layers + 1
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + i * step + j}.{0 if kind == 'resnets' else 1}.{_resnet(rest) if kind == 'resnets' else rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{0 if m[1] == '0' else 2}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * step + j}.{0 if kind == 'resnets' else 1}.{_resnet(rest) if kind == 'resnets' else rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{i * step + layers}.{2 if i in up_attention else 1}.conv.{m[2]}"
    raise ModelError(f"no single-file name for U-Net weight {key!r}", field="output.single_file",
                     fix="set output.single_file: false for this model")


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET.get(name, name)}.{tail}"


def _vae_key(key: str, blocks: int, top: dict[str, str]) -> str:
    if key in top:
        return top[key]
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        if m[2] in _VAE_ATTENTION:
            return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    raise ModelError(f"no single-file name for VAE weight {key!r}", field="output.single_file",
                     fix="set output.single_file: false for this model")


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.", 1) if rest.startswith("conv_shortcut.") else rest


def single_file_state_dict(pipe, dtypes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pipeline's U-Net, VAE and text encoder under original (LDM) keys, each in ``dtypes[component]``
    (default: as in memory), on the CPU."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    check_exportable(pipe)
    dtypes = dtypes or {}
    unet, vae = pipe.unet, pipe.vae
    up_attention = {i for i, kind in enumerate(unet.config.up_block_types) if kind.startswith("CrossAttn")}
    unet_top = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    vae_top = dict(DIFFUSERS_TO_LDM_MAPPING["vae"])
    blocks = len(vae.config.block_out_channels)

    def cast(value, component):
        value = value.detach().to("cpu")
        dtype = dtypes.get(component)
        return (value.to(dtype) if dtype is not None and value.is_floating_point() else value).contiguous()

    out: dict[str, Any] = {}
    for key, value in unet.state_dict().items():
        out[UNET_PREFIX + _unet_key(key, unet.config.layers_per_block, up_attention, unet_top)] = cast(value, "unet")
    for key, value in vae.state_dict().items():
        name = _vae_key(key, blocks, vae_top)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original stores these projections as 1x1 convolutions
        out[VAE_PREFIX + name] = cast(value, "vae")
    for key, value in pipe.text_encoder.state_dict().items():
        # The original files name CLIP's weights as transformers 4 did, under text_model.
        out[TEXT_PREFIX + (key if key.startswith("text_model.") else f"text_model.{key}")] = cast(value, "text_encoder")
    if len(out) != len(unet.state_dict()) + len(vae.state_dict()) + len(pipe.text_encoder.state_dict()):
        raise ModelError("two weights map to one single-file name", field="output.single_file",
                         fix="set output.single_file: false for this model")
    return out


def write_single_file(pipe, path: Path, dtypes: dict[str, Any] | None = None, metadata: dict[str, str] | None = None) -> dict:
    """Write the pipeline as one ``.safetensors`` file at ``path``; returns what the edit record keeps."""
    from safetensors.torch import save_file

    state = single_file_state_dict(pipe, dtypes)
    save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})
    return {"file": Path(path).name, "format": FORMAT, "bytes": Path(path).stat().st_size, "tensors": len(state),
            "load": f"StableDiffusionPipeline.from_single_file('<folder>/{Path(path).name}', config='<folder>')"}
