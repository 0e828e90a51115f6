"""The concepts of the embedded world, with their training phrasings, held-out paraphrases and neighbours.

Training captions only ever use ``names`` and the caption templates below. The paraphrases are held out:
they are never shown to the denoiser or the judge during training, so they measure whether erasure reaches
prompts that evoke a concept without naming it the trained way.

Every style, character, person and unsafe concept has two disjoint held-out splits, stored once, as text
files (one prompt a line, ``#`` lines are comments):

- ``heldout/dev/<key>.txt`` (``Concept.dev_paraphrases``): for tuning. Benchmarks, settings sweeps and
  anything else that chooses parameters read this split only.
- ``heldout/test/<key>.txt`` (``Concept.test_paraphrases``): scores releases (the paraphrase probe of a
  release policy). Nothing that tunes may read it, so its prompts stay unseen until a release is scored.

The files are read when asked for, one split at a time, so code that reads the dev split never opens the
test files. ``heldout/README.md`` says how the splits were made and how to add prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HELDOUT_DIR = Path(__file__).resolve().with_name("heldout")
SPLITS = ("dev", "test")
HELDOUT_CATEGORIES = ("style", "character", "person", "unsafe")  # the categories with held-out paraphrases


def heldout_file(key: str, split: str) -> Path:
    """The file of one concept's held-out split (``dev`` or ``test``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown held-out split {split!r}; use one of {SPLITS}")
    return HELDOUT_DIR / split / f"{key}.txt"


def read_heldout(key: str, split: str) -> tuple[str, ...]:
    """The prompts of one concept's held-out split, in file order."""
    text = heldout_file(key, split).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


@dataclass(frozen=True)
class Concept:
    key: str
    category: str  # style | character | person | unsafe | object
    names: tuple[str, ...]  # phrasings used in training captions; names[0] is canonical

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def has_heldout(self) -> bool:
        return self.category in HELDOUT_CATEGORIES

    def heldout(self, split: str) -> tuple[str, ...]:
        """Held-out paraphrases of one split; () for objects, which have none."""
        return read_heldout(self.key, split) if self.has_heldout else ()

    @property
    def dev_paraphrases(self) -> tuple[str, ...]:
        """Held-out prompts for tuning: benchmarks and sweeps read these only."""
        return self.heldout("dev")

    @property
    def test_paraphrases(self) -> tuple[str, ...]:
        """Held-out prompts that score releases; never read by anything that tunes."""
        return self.heldout("test")

    @property
    def paraphrases(self) -> tuple[str, ...]:
        """Both splits, dev first (reads the test files too: not for tuning)."""
        return self.dev_paraphrases + self.test_paraphrases


STYLES = (
    Concept("van_gogh", "style", ("Van Gogh", "Vincent van Gogh")),
    Concept("warhol", "style", ("Andy Warhol", "Warhol")),
    Concept("mondrian", "style", ("Piet Mondrian", "Mondrian")),
    Concept("sketch", "style", ("pencil sketch", "pencil drawing")),
)

CHARACTERS = (
    Concept("pikachu", "character", ("Pikachu",)),
    Concept("mario", "character", ("Mario", "Super Mario")),
    Concept("sonic", "character", ("Sonic the Hedgehog", "Sonic")),
    Concept("mickey", "character", ("Mickey Mouse",)),
)

PEOPLE = (
    Concept("einstein", "person", ("Albert Einstein", "Einstein")),
    Concept("obama", "person", ("Barack Obama", "Obama")),
    Concept("taylor_swift", "person", ("Taylor Swift",)),
    Concept("elon_musk", "person", ("Elon Musk",)),
)

UNSAFE = (
    Concept("blood", "unsafe", ("blood splatter", "blood")),
    Concept("gun", "unsafe", ("a gun", "a pistol")),
)

OBJECTS = (
    Concept("apple", "object", ("an apple",)),
    Concept("tree", "object", ("a tree",)),
    Concept("house", "object", ("a house",)),
    Concept("car", "object", ("a car",)),
    Concept("boat", "object", ("a sailing boat", "a boat")),
    Concept("flower", "object", ("a flower",)),
    Concept("fish", "object", ("a fish",)),
    Concept("cup", "object", ("a cup", "a coffee mug")),
)

# A scene with no subject: the generic class a judge falls back to when a concept is gone.
EMPTY = Concept("empty", "object", ("an empty background", "nothing"))

SUBJECTS = CHARACTERS + PEOPLE + UNSAFE + OBJECTS + (EMPTY,)
ALL = STYLES + SUBJECTS
BY_KEY = {c.key: c for c in ALL}
PLAIN_STYLE = "plain"

# Caption templates. {s} is a subject phrase, {st} a style phrase.
SUBJECT_TEMPLATES = ("{s}", "a picture of {s}", "an image of {s}", "a photo of {s}")
STYLE_TEMPLATES = {
    "van_gogh": ("{s} in the style of {st}", "{s}, painting by {st}", "a {st} painting of {s}"),
    "warhol": ("{s} in the style of {st}", "{s}, pop art by {st}", "an {st} print of {s}"),
    "mondrian": ("{s} in the style of {st}", "{s}, painting by {st}", "a {st} painting of {s}"),
    "sketch": ("a {st} of {s}", "{s}, {st}", "{s} as a {st}"),
}
STYLE_ONLY_TEMPLATES = {
    "van_gogh": ("a painting by {st}", "in the style of {st}"),
    "warhol": ("a pop art print by {st}", "in the style of {st}"),
    "mondrian": ("a painting by {st}", "in the style of {st}"),
    "sketch": ("a {st}", "a {st} on paper"),
}


def neighbours(key: str) -> tuple[str, ...]:
    """Concepts of the same category, which an edit of ``key`` must keep."""
    category = BY_KEY[key].category
    return tuple(c.key for c in ALL if c.category == category and c.key != key and c.key != EMPTY.key)


def canonical_prompt(subject: str | None, style: str | None) -> str:
    """The prompt a probe uses for a concept pair: the first template of each."""
    s = BY_KEY[subject].name if subject else None
    if style and style != PLAIN_STYLE:
        st = BY_KEY[style].name
        if s is None:
            return STYLE_ONLY_TEMPLATES[style][0].format(st=st)
        return STYLE_TEMPLATES[style][0].format(s=s, st=st)
    return SUBJECT_TEMPLATES[1].format(s=s)
