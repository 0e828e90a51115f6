"""Values as the audit database stores and hashes them: UTC times, ULIDs, JSON data, canonical JSON and the
digests of events, rows and model file lists. No SQLAlchemy here."""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from safeguard.files import tree_sha256  # noqa: F401  (the model tree hash, re-exported with the other digests)

GENESIS_HASH = "0" * 64  # prev_hash of the first event


def utc_now() -> str:
    """The current UTC time as ISO 8601 text with microseconds and a ``Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_id_lock = threading.Lock()
_last_id = [0, 0]  # [milliseconds, random part] of the last id this process made


def _forget_last_id() -> None:
    _last_id[:] = [0, 0]


os.register_at_fork(after_in_child=_forget_last_id)  # forked children must not continue the parent's sequence


def new_id() -> str:
    """A ULID: 48 bits of milliseconds and 80 random bits in Crockford base32, increasing within a process."""
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, last_random = _last_id
        if ms <= last_ms:  # same millisecond, or the clock stepped back: keep counting up from the last id
            ms, random_part = last_ms, last_random + 1
            if random_part >> 80:
                ms, random_part = last_ms + 1, 0
        else:
            random_part = int.from_bytes(os.urandom(10), "big")
        _last_id[:] = [ms, random_part]
    value = (ms << 80) | random_part
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def json_value(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON data that survives a database round trip unchanged.

    Tuples become lists, keys strings, numpy/torch scalars and arrays Python numbers and lists, paths strings, and
    NaN/Infinity the strings ``"NaN"``/``"Infinity"``/``"-Infinity"`` (PostgreSQL's json type rejects them).
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): json_value(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return json_value(value.tolist(), where)
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in the audit database; convert it to JSON data")


def json_document(value: Any, where: str = "value") -> Any:
    """``json_value`` for a JSON column or event payload: an object, an array or None.

    A bare number is refused because SQLite gives JSON columns numeric affinity and would turn 1.0 into 1.
    """
    value = json_value(value, where)
    if value is not None and not isinstance(value, (dict, list)):
        raise TypeError(f"{where}: must be a JSON object or array (or None), not {type(value).__name__}")
    return value



def canonical_json(value: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 text (not \\u escapes), floats as ``repr``."""
    return json.dumps(json_value(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def event_row_hash(prev_hash: str, seq: int, run_id: str | None, event_name: str, payload: Any, created_at: str) -> str:
    """sha256 of ``prev_hash`` followed by the canonical JSON of the event's fields."""
    body = canonical_json({"seq": seq, "run_id": run_id, "event": event_name, "payload": payload,
                           "created_at": created_at})
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def record_digest(row: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of one database row (column name to value).

    NULL columns are left out, so a column added by a later migration (NULL in old rows) leaves the digests
    recorded before it existed valid.
    """
    return hashlib.sha256(canonical_json({k: v for k, v in dict(row).items() if v is not None}).encode("utf-8")).hexdigest()


_tree_sha256 = tree_sha256  # for methods whose tree_sha256 argument hides the function


def model_file_list(files: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A model's files as [{path, sha256 (lower-case), size}] sorted by path."""
    return sorted(({"path": str(f["path"]), "sha256": str(f["sha256"]).lower(), "size": int(f["size"])}
                   for f in files), key=lambda f: f["path"])
