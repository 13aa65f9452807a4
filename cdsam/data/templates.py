"""Prompt ensembling: several templates per class name (``prepare.prompt_templates``).

A sample's prompt is its class name in the first template (``"a photo of a dog"``), so the
prepared rows, ids and per-prompt figures read as with one template. ``prepare`` writes the
templates and each prompt's class name beside the rows (``prompts.json``; absent with one
template). Training shows each sample one template, drawn per (seed, epoch, sample) like the
augmentation; validation, ``evaluate``, ``cdsam predict --class`` and the demo give the model
the mean of the L2-normalised text features over every template, renormalised, as CLIP's
zero-shot evaluation does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdsam import io
from cdsam.config.schema import PrepareConfig
from cdsam.data.shards import PROMPTS as PROMPTS_FILE
from cdsam.errors import DataError


def templates_of(cfg: PrepareConfig) -> list[str]:
    """The templates prepare formats class names with: ``prompt_templates``, or the single
    ``prompt_template``."""
    return list(cfg.prompt_templates) if cfg.prompt_templates else [cfg.prompt_template]


def class_prompt(cfg: PrepareConfig, name: str) -> str:
    """A class's prompt in the prepared rows: its name in the first template."""
    return templates_of(cfg)[0].format(name)


def name_in(template: str, prompt: str) -> str | None:
    """The class name ``template`` was filled with to give ``prompt``; None if it was not."""
    head, _, tail = template.partition("{}")
    if len(prompt) > len(head) + len(tail) and prompt.startswith(head) and prompt.endswith(tail):
        return prompt[len(head):len(prompt) - len(tail)]
    return None


def template_draw(seed: int, epoch: int, index: int, count: int) -> int:
    """The template a training sample shows in an epoch: seeded per (seed, epoch, sample), on a
    stream of its own (the augmentation's and the clicks' draws are unchanged by it)."""
    state = np.random.SeedSequence([seed, epoch, index, 0x7E3]).generate_state(1, np.uint64)[0]
    return int(state % np.uint64(count))


@dataclass(frozen=True)
class PromptEnsembles:
    """The templates and, per prompt of the vocabulary, its class name."""

    templates: list[str]
    names: dict[str, str]  # prompt (name in the first template) -> class name

    @classmethod
    def for_prompts(cls, templates: list[str], prompts: list[str]) -> PromptEnsembles:
        """The ensembles of the prompts that are a class name in the first template (a fixed
        binary prompt is not, and keeps its one text)."""
        names = {p: n for p in sorted(set(prompts)) if (n := name_in(templates[0], p))}
        return cls(list(templates), names)

    @classmethod
    def of_classes(cls, templates: list[str], names: list[str]) -> PromptEnsembles:
        return cls(list(templates), {templates[0].format(n): n for n in names})

    def variants(self, prompt: str) -> list[str]:
        """Every template's text for ``prompt`` (the prompt alone when it has no class)."""
        name = self.names.get(prompt)
        return [prompt] if name is None else [t.format(name) for t in self.templates]

    def variant(self, prompt: str, draw: int) -> str:
        """The text of template ``draw`` for ``prompt``."""
        texts = self.variants(prompt)
        return texts[draw % len(texts)]

    def to_dict(self) -> dict[str, Any]:
        return {"templates": self.templates, "names": self.names}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> PromptEnsembles:
        try:
            templates = [str(t) for t in raw["templates"]]
            names = {str(k): str(v) for k, v in dict(raw["names"]).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: bad prompt ensembles ({exc})") from None
        if not templates or any("{}" not in t for t in templates):
            raise DataError(f"{where}: every template must contain '{{}}'")
        return cls(templates, names)

    def write(self, root: Path) -> Path:
        path = Path(root) / PROMPTS_FILE
        io.write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


def read_ensembles(root: str | Path) -> PromptEnsembles | None:
    """The prepared data's prompt ensembles; None with one template."""
    path = Path(root) / PROMPTS_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: corrupt JSON ({exc})") from None
    return PromptEnsembles.from_dict(raw, str(path))
