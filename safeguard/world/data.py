"""Training scenes and captions for the embedded world (canonical names and a modest set of phrasings only)."""
from __future__ import annotations

import numpy as np

from . import concepts as C
from .render import render

STYLE_WEIGHTS = {"plain": 0.36, "van_gogh": 0.16, "warhol": 0.16, "mondrian": 0.16, "sketch": 0.16}
STYLE_KEYS = tuple(STYLE_WEIGHTS)
SUBJECT_KEYS = tuple(c.key for c in C.SUBJECTS)


def caption(subject: str, style: str, rng: np.random.Generator) -> str:
    s = rng.choice(C.BY_KEY[subject].names)
    if style == C.PLAIN_STYLE:
        if subject == C.EMPTY.key:
            return str(s)
        return str(rng.choice(C.SUBJECT_TEMPLATES)).format(s=s)
    st = rng.choice(C.BY_KEY[style].names)
    if subject == C.EMPTY.key:
        return str(rng.choice(C.STYLE_ONLY_TEMPLATES[style])).format(st=st)
    return str(rng.choice(C.STYLE_TEMPLATES[style])).format(s=s, st=st)


def sample_scenes(n: int, seed: int) -> list[tuple[str, str, int, str]]:
    """n (subject, style, render seed, caption) tuples, deterministic in seed."""
    rng = np.random.default_rng(seed)
    styles = rng.choice(STYLE_KEYS, size=n, p=list(STYLE_WEIGHTS.values()))
    subjects = rng.choice(SUBJECT_KEYS, size=n)
    render_seeds = rng.integers(0, 2**31, size=n)
    return [(str(s), str(st), int(r), caption(str(s), str(st), rng)) for s, st, r in zip(subjects, styles, render_seeds)]


def render_many(scenes) -> np.ndarray:
    return np.stack([np.asarray(render(s, st, r)) for s, st, r, _ in scenes])
