"""Synthetic XML: next-character prediction over a stream of random well-formed documents.

Tags are 2..10 random lowercase letters. A document opens a root tag; then, at
each step, with probability ``close_probability`` (0.5) or once ``max_steps``
(50) steps have passed, the most recently opened tag is closed, and otherwise a
new random tag is opened; the document ends when no tag is open. Documents are
separated by a newline. Every character is a scored target.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from functools import partial

from cellsearch.config import option
from cellsearch.tasks.base import Task, TaskFile, data_config
from cellsearch.tasks.synthetic import Example, StreamSizes, build_splits

__all__ = ["XmlData", "VOCABULARY", "make_document", "build"]

VOCABULARY = tuple(string.ascii_lowercase) + ("<", "/", ">", "\n")


@dataclass(frozen=True)
class XmlData(StreamSizes):
    min_tag_length: int = option(2, "shortest tag name (paper: 2)", check=lambda n: n >= 1, rule=">= 1")
    max_tag_length: int = option(10, "longest tag name (paper: 10)", check=lambda n: 1 <= n <= 100, rule="1..100")
    close_probability: float = option(0.5, "chance of closing the innermost tag at a step (paper: 0.5)",
                                      check=lambda p: 0 < p <= 1, rule="0 < p <= 1")
    max_steps: int = option(50, "after this many steps only closing is allowed (paper: 50)",
                            check=lambda n: 1 <= n <= 10_000, rule="1..10000")

    def __post_init__(self) -> None:
        if self.min_tag_length > self.max_tag_length:
            raise ValueError(f"min_tag_length {self.min_tag_length} exceeds max_tag_length {self.max_tag_length}")


def make_document(config: XmlData, rng: random.Random) -> Example:
    """One document followed by a newline; every character is scored."""
    def new_tag() -> str:
        length = rng.randint(config.min_tag_length, config.max_tag_length)
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))

    root = new_tag()
    stack = [root]
    pieces = [f"<{root}>"]
    steps = 1
    while stack:
        if steps >= config.max_steps or rng.random() < config.close_probability:
            pieces.append(f"</{stack.pop()}>")
        else:
            tag = new_tag()
            stack.append(tag)
            pieces.append(f"<{tag}>")
        steps += 1
    text = "".join(pieces) + "\n"
    return text, "1" * len(text)


def build(definition: TaskFile, data_dir: str | None = None) -> Task:
    config = data_config(XmlData, definition)
    splits = build_splits(partial(make_document, config), config, VOCABULARY)
    return Task(definition, VOCABULARY, splits, source=f"generated from seed {config.seed}")
