"""The memorisation filter: read 5 symbols drawn from 26, then reproduce them in order.

One example is ``abcde=abcde.``: the symbols, ``=``, the symbols again (the
scored targets, predicted with teacher forcing) and ``.`` before the next
example. A cell passes the filter with a held-out accuracy of at least 0.95 on
the reproduced symbols (the task's ``pass_score``).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from functools import partial

from cellsearch.config import option
from cellsearch.tasks.base import Task, TaskFile, data_config
from cellsearch.tasks.synthetic import Example, StreamSizes, build_splits

__all__ = ["MemorizeData", "VOCABULARY", "make_example", "build"]

SEPARATOR = "="
END = "."
VOCABULARY = tuple(string.ascii_lowercase) + (SEPARATOR, END)


@dataclass(frozen=True)
class MemorizeData(StreamSizes):
    length: int = option(5, "symbols to remember (paper: 5)", check=lambda n: 1 <= n <= 100, rule="1..100")
    alphabet: int = option(26, "symbols drawn from the first N letters (paper: 26)", check=lambda n: 2 <= n <= 26,
                           rule="2..26")


def make_example(config: MemorizeData, rng: random.Random) -> Example:
    """One example and its mask ('1' under each reproduced symbol)."""
    letters = string.ascii_lowercase[: config.alphabet]
    symbols = "".join(rng.choice(letters) for _ in range(config.length))
    text = symbols + SEPARATOR + symbols + END
    mask = "0" * (config.length + 1) + "1" * config.length + "0"
    return text, mask


def build(definition: TaskFile, data_dir: str | None = None) -> Task:
    config = data_config(MemorizeData, definition)
    splits = build_splits(partial(make_example, config), config, VOCABULARY)
    return Task(definition, VOCABULARY, splits, source=f"generated from seed {config.seed}")
