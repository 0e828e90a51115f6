"""Where and how models run, and what the user sees while they do.

- device and dtype: ``--device auto|cpu|cuda[:N]|mps`` and ``--dtype auto|float32|float16|bfloat16``
  (:func:`resolve_device`, :func:`resolve_dtype`); ``auto`` picks CUDA, then MPS, then the CPU, computes in
  float32 on the CPU whatever the files hold, and keeps the model's stored dtype on an accelerator;
- diffusers' memory modes (model CPU offload, attention slicing), applied when a pipeline is loaded;
- library verbosity: at the default verbosity the load reports, warnings and progress bars of transformers,
  diffusers, huggingface_hub and open_clip are silenced with the libraries' own switches; ``-v`` restores them;
- one progress display on stderr for every long phase (capture, each probe, each attack search): counts,
  elapsed time and an ETA, redrawn in place on a terminal; off with ``--quiet``, off when stderr is not a
  terminal or ``CI`` is set unless ``--progress`` asks for it (then one line every few seconds, for logs);
- unexpected errors reported as one line naming what was being done and a fix (``--debug``: the traceback).

Nothing here imports torch or a model library at import time; the CLI configures this module before any
command runs, and code that loads models calls :func:`apply_library_settings` just before doing so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import SafeguardError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# Packages whose logs and warnings are silenced at the default verbosity.
THIRD_PARTY = ("transformers", "diffusers", "huggingface_hub", "open_clip", "timm", "torch", "torchvision",
               "accelerate", "safetensors", "tokenizers", "PIL")
_THIRD_PARTY_MODULES = r"^(" + "|".join(re.escape(p) for p in THIRD_PARTY) + r")(\.|$)"


@dataclass(frozen=True)
class Settings:
    """How models run and how much is shown; :func:`configure` replaces the process-wide settings."""
    device: str = "auto"
    dtype: str = "auto"
    cpu_offload: bool = False
    attention_slicing: bool = False
    verbosity: int = 0  # 0: quiet libraries; 1 (-v): their own defaults; 2 (-vv): their info logs
    quiet: bool = False  # no progress display
    progress: bool = False  # a progress display even when stderr is not a terminal (one line every few seconds)
    debug: bool = False  # tracebacks of unexpected errors


def _from_environment() -> Settings:
    """The defaults, with ``SAFEGUARD_DEVICE`` and ``SAFEGUARD_DTYPE`` applied (checked when used), so
    scripts and tests that never go through the CLI honour them too."""
    return Settings(device=os.environ.get("SAFEGUARD_DEVICE") or "auto", dtype=os.environ.get("SAFEGUARD_DTYPE") or "auto")


_settings = _from_environment()
_applied: Settings | None = None  # what apply_library_settings last applied


def current() -> Settings:
    return _settings


def configure(**changes) -> Settings:
    """Change the process-wide settings (unknown names raise TypeError) and apply the library verbosity to
    the libraries already imported; the others get it from :func:`apply_library_settings` when loaded."""
    global _settings
    if "device" in changes:
        changes["device"] = check_device(changes["device"])
    if "dtype" in changes:
        changes["dtype"] = check_dtype(changes["dtype"])
    _settings = dataclasses.replace(_settings, **changes)
    if any(name in sys.modules for name in ("transformers", "diffusers", "open_clip")):
        apply_library_settings()
    return _settings


def reset() -> Settings:
    """Back to the defaults (the environment's device and dtype, else auto; quiet libraries)."""
    global _settings
    _settings = _from_environment()
    return _settings


# ------------------------------------------------------------------------------------------ device, dtype
def check_device(spec: str) -> str:
    """The normalised device spelling, checked without importing torch."""
    value = str(spec).strip().lower()
    if not _DEVICE_RE.match(value):
        raise SafeguardError(f"unknown device {spec!r}", field="--device", fix=f"use one of: {DEVICE_CHOICES}")
    return value


def check_dtype(spec: str) -> str:
    value = str(spec).strip().lower()
    if value not in DTYPES:
        raise SafeguardError(f"unknown dtype {spec!r}", field="--dtype", fix=f"use one of: {', '.join(DTYPES)}")
    return value


def _mps_available(torch) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | None = None):
    """The ``torch.device`` for ``spec`` (default: the configured ``--device``).

    ``auto`` is the first CUDA device when torch sees one, else MPS, else the CPU. An explicit accelerator
    that is not there is an error, never a silent fall-back to the CPU.
    """
    import torch

    value = check_device(spec if spec is not None else _settings.device)
    if value == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available(torch):
            return torch.device("mps")
        return torch.device("cpu")
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SafeguardError("torch sees no CUDA device", field=f"--device {value}",
                                 fix="use --device cpu (or auto), or install a CUDA build of torch that matches the driver")
        index = int(value.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise SafeguardError(f"there are only {count} CUDA device(s)", field=f"--device {value}",
                                 fix=f"use cuda:0 to cuda:{count - 1}")
    if value == "mps" and not _mps_available(torch):
        raise SafeguardError("torch sees no MPS device", field="--device mps", fix="use --device cpu (or auto)")
    return torch.device(value)


def resolve_dtype(spec: str | None = None, device=None, stored=None):
    """The ``torch.dtype`` models compute in, for ``spec`` (default: the configured ``--dtype``).

    ``auto`` is float32 on the CPU, whatever the files hold (half precision is slow there and not every CPU
    kernel has it), and on an accelerator the ``stored`` dtype of the model files (float32 when unknown).
    """
    import torch

    value = check_dtype(spec if spec is not None else _settings.dtype)
    if value != "auto":
        return getattr(torch, value)
    device = torch.device(device) if device is not None else resolve_device()
    if device.type == "cpu":
        return torch.float32
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return stored if stored in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def place_pipeline(pipe, device, *, cpu_offload: bool | None = None, attention_slicing: bool | None = None):
    """Move a loaded pipeline to ``device``, or let diffusers offload it there one model at a time, and turn
    on attention slicing; both memory modes are diffusers' own (default: the configured flags)."""
    cpu_offload = _settings.cpu_offload if cpu_offload is None else cpu_offload
    attention_slicing = _settings.attention_slicing if attention_slicing is None else attention_slicing
    if cpu_offload:
        if device.type == "cpu":
            raise SafeguardError("needs an accelerator to offload to, and the device is the CPU",
                                 field="--cpu-offload", fix="drop --cpu-offload, or choose --device cuda")
        try:
            import accelerate  # noqa: F401  (diffusers' offload is built on it)
        except ImportError:
            raise SafeguardError("needs the accelerate package", field="--cpu-offload",
                                 fix="pip install accelerate, or drop --cpu-offload") from None
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if attention_slicing:
        pipe.enable_attention_slicing()
    return pipe


def execution_device(pipe):
    """Where the pipeline computes: its execution device under CPU offload, else its device."""
    return getattr(pipe, "_execution_device", None) or pipe.device


# --------------------------------------------------------------------------------------- library verbosity
class _OpenClipRootFilter(logging.Filter):
    """open_clip logs through the root logger (``logging.warning(...)``); below ``-v`` those records go."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _settings.verbosity >= 1 or record.levelno >= logging.ERROR:
            return True
        path = record.pathname.replace("\\", "/")
        return "/open_clip/" not in path and "/timm/" not in path


_ROOT_FILTER = _OpenClipRootFilter()


def apply_library_settings() -> None:
    """Apply the configured verbosity to transformers, diffusers, huggingface_hub and open_clip, through
    their own logging and progress-bar switches. Cheap when nothing changed since the last call."""
    global _applied
    settings = _settings
    if _applied == settings:
        return
    verbose = settings.verbosity
    root = logging.getLogger()
    if _ROOT_FILTER not in root.filters:
        root.addFilter(_ROOT_FILTER)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as tlogging

        _set_library(tlogging, verbose)
    with contextlib.suppress(ImportError):
        from diffusers.utils import logging as dlogging

        _set_library(dlogging, verbose)
    with contextlib.suppress(ImportError):
        from huggingface_hub import utils as hub_utils

        (hub_utils.enable_progress_bars if verbose >= 1 else hub_utils.disable_progress_bars)()
    _applied = settings


def _set_library(lib_logging, verbose: int) -> None:
    if verbose >= 2:
        lib_logging.set_verbosity_info()
    elif verbose == 1:
        lib_logging.set_verbosity(lib_logging._get_default_logging_level())
    else:
        lib_logging.set_verbosity_error()
    (lib_logging.enable_progress_bar if verbose >= 1 else lib_logging.disable_progress_bar)()


@contextlib.contextmanager
def library_warnings() -> Iterator[None]:
    """Within the block, Python warnings raised from third-party packages are hidden below ``-v``."""
    with warnings.catch_warnings():
        if _settings.verbosity < 1:
            warnings.filterwarnings("ignore", module=_THIRD_PARTY_MODULES)
        yield


# ------------------------------------------------------------------------------------------------ progress
class Progress:
    """``label: done/total (elapsed, ETA remaining)`` on stderr; silent unless enabled.

    On a terminal the line is redrawn in place (at most every 0.1 s) and cleared on close; on any other stream
    (``--progress`` into a log) it is written as a new line at most every ``LOG_INTERVAL`` seconds and once
    more at the end. The ETA assumes the remaining items take as long as the done ones did on average; a probe that
    decides early finishes before it.
    """
    LOG_INTERVAL = 10.0

    def __init__(self, label: str, total: int | None = None, *, enabled: bool | None = None, stream=None):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.enabled = progress_enabled(self.stream) if enabled is None else enabled
        isatty = getattr(self.stream, "isatty", None)
        self.inline = bool(isatty and isatty())
        self.started = time.monotonic()
        self._drawn_at = self.started if not self.inline else 0.0
        self._drawn_done: int | None = None
        self._width = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        interval = 0.1 if self.inline else self.LOG_INTERVAL
        if self.enabled and (now - self._drawn_at >= interval or self.done == self.total):
            self._draw(now)

    def text(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self.started
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        timing = _elapsed(elapsed)
        if self.total and 0 < self.done < self.total:
            timing += f", ETA {_elapsed(elapsed / self.done * (self.total - self.done))}"
        return f"{self.label}: {count} ({timing})"

    def _draw(self, now: float) -> None:
        text = self.text(now)
        if self.inline:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn_at, self._drawn_done = now, self.done

    def close(self) -> None:
        if self.enabled and not self.inline and self.done and self.done != self._drawn_done:
            self._draw(time.monotonic())  # a log ends every phase with its final count
        if self.enabled and self.inline and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def _elapsed(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_enabled(stream=None) -> bool:
    """Off with ``--quiet``; on with ``--progress``; otherwise on a terminal, outside CI."""
    stream = stream or sys.stderr
    if _settings.quiet:
        return False
    if _settings.progress:
        return True
    if os.environ.get("CI"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def progress(label: str, total: int | None = None) -> Iterator[Progress]:
    bar = Progress(label, total)
    try:
        yield bar
    finally:
        bar.close()


def track(items, label: str, total: int | None = None):
    """Iterate over ``items`` with a progress display counting them (``total`` default: ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with progress(label, total) as bar:
        for item in items:
            yield item
            bar.advance()


# ------------------------------------------------------------------------------------ unexpected errors
_PHASE_ATTR = "_safeguard_phase"


@contextlib.contextmanager
def phase(what: str, fix: str | None = None) -> Iterator[None]:
    """Name what the block does, for the one-line report of an unexpected error raised inside it.

    The innermost phase wins; :class:`SafeguardError` passes through untouched (it has its own line).
    """
    try:
        yield
    except SafeguardError:
        raise
    except Exception as exc:
        if getattr(exc, _PHASE_ATTR, None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(exc, _PHASE_ATTR, (what, fix))
        raise


def _known_fix(exc: BaseException) -> str | None:
    text = str(exc)
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in text.lower():
        return ("free memory: --dtype float16, --attention-slicing or --cpu-offload on an accelerator, "
                "fewer images per batch (probes.batch_size), or --device cpu")
    if "must have the same dtype" in text or ("expected" in text.lower() and "dtype" in text.lower()):
        return "run with --dtype float32"
    if "same device" in text or "Expected all tensors to be on" in text:
        return "run with --device cpu, or report this with the --debug traceback"
    if "CUDA" in text or "cuDNN" in text or "MPS" in text:
        return "run with --device cpu to rule out the accelerator"
    return None


def describe_error(exc: BaseException, default_phase: str) -> str:
    """One line for an unexpected error: what was being done, the error, and a fix."""
    what, fix = getattr(exc, _PHASE_ATTR, None) or (default_phase, None)
    lines = str(exc).strip().splitlines()
    message = lines[0][:300] if lines else ""
    fix = fix or _known_fix(exc) or "run again with --debug for the traceback, and report it"
    error = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return " ".join(f"{what}: {error} (fix: {fix})".split())
