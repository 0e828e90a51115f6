"""Prompt sets shipped for real models: everyday prompts that an edit must not disturb, and everyday
objects to pair with an erased concept ("X next to Y": once X is erased, Y must still be drawn)."""
from __future__ import annotations

from importlib import resources


def _read(name: str) -> list[str]:
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def general_prompts() -> list[str]:
    """Diverse everyday prompts (objects, animals, food, places, vehicles, people, weather, interiors, ...)."""
    return _read("general.txt")


def companion_objects() -> list[str]:
    """Everyday objects, each with its article ("a red umbrella"), for selective-alignment prompts."""
    return _read("companions.txt")
