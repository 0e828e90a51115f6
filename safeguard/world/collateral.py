"""Held-out prompts of the embedded world's concepts, for measuring what an edit damages outside its policy.

Prompts come from the world's own caption templates (the phrasings the model renders best), so a concept
that the unedited model draws reliably is measured where a loss shows. Every prompt an eraser was given is
left out, and no prompt uses a banned concept, so each prompt tests one unbanned concept alone.
"""
from __future__ import annotations

from . import concepts as C


def world_concept(name: str) -> C.Concept | None:
    """The world concept one of whose names is ``name`` (case-insensitive), if any."""
    key = name.strip().lower()
    return next((c for c in C.ALL if key in (n.lower() for n in c.names)), None)


def banned_keys(names) -> set[str]:
    return {c.key for c in map(world_concept, names) if c is not None}


def _spread(candidates: list[str], exclude: set[str], k: int) -> list[str]:
    """``k`` candidates not in ``exclude``, taken evenly across the list so templates and names vary."""
    pool = [p for p in dict.fromkeys(candidates) if p not in exclude]
    if len(pool) <= k:
        return pool
    step = len(pool) / k
    return [pool[int(i * step)] for i in range(k)]


def _styles(banned: set[str]) -> list[C.Concept]:
    return [c for c in C.STYLES if c.key not in banned]


def _subjects(banned: set[str]) -> list[C.Concept]:
    return [c for c in C.SUBJECTS if c.key not in banned and c.key != C.EMPTY.key]


def subject_prompts(concept: C.Concept, banned: set[str]) -> list[str]:
    plain = [t.format(s=n) for n in concept.names for t in C.SUBJECT_TEMPLATES]
    styled = [t.format(s=n, st=st.name) for st in _styles(banned) for t in C.STYLE_TEMPLATES[st.key] for n in concept.names]
    return plain + styled


def style_prompts(concept: C.Concept, banned: set[str]) -> list[str]:
    objects = [c for c in _subjects(banned) if c.category == "object"]
    others = [c for c in _subjects(banned) if c.category != "object"]
    combos = [t.format(s=s.name, st=n) for s in objects + others for t in C.STYLE_TEMPLATES[concept.key] for n in concept.names]
    return combos + [t.format(st=n) for t in C.STYLE_ONLY_TEMPLATES[concept.key] for n in concept.names]


def collateral_prompts(banned_names, exclude: set[str], per_concept: int) -> list[tuple[C.Concept, list[str]]]:
    """For every world concept the policy does not ban: up to ``per_concept`` held-out prompts."""
    banned = banned_keys(banned_names)
    out = []
    for concept in [c for c in C.ALL if c.key not in banned and c.key != C.EMPTY.key]:
        candidates = style_prompts(concept, banned) if concept.category == "style" else subject_prompts(concept, banned)
        out.append((concept, _spread(candidates, exclude, per_concept)))
    return out


def selective_prompts(concept: C.Concept, banned_names, exclude: set[str], k: int) -> list[tuple[C.Concept, str]]:
    """Prompts that pair a banned concept with an unbanned one; the unbanned one must still be rendered.
    A banned style is paired with objects (judged on the subject), a banned subject with styles."""
    banned = banned_keys(banned_names)
    if concept.category == "style":
        pairs = [(s, t.format(s=s.name, st=n)) for s in _subjects(banned) if s.category == "object"
                 for t in C.STYLE_TEMPLATES[concept.key] for n in concept.names]
    else:
        pairs = [(st, t.format(s=n, st=st.name)) for st in _styles(banned) if st.key != C.PLAIN_STYLE
                 for t in C.STYLE_TEMPLATES[st.key] for n in concept.names]
    prompts = _spread([p for _, p in pairs], exclude, k)
    chosen = dict((p, c) for c, p in pairs)
    return [(chosen[p], p) for p in prompts]


def labels(category: str) -> list[str]:
    """The world's label vocabulary for a style or a subject judgement (display names)."""
    if category == "style":
        return [c.name for c in C.STYLES] + [C.PLAIN_STYLE]
    return [c.name for c in C.SUBJECTS]
