"""Shared machinery of the generated tasks: per-split seeds and stream building.

A generated task draws its training, validation and test streams from three
child seeds of one data seed (``numpy.random.SeedSequence(seed).spawn(3)``), so
the held-out streams never share the training stream's seed, and every cell is
trained and scored on the same data. Examples are concatenated into one stream;
a parallel mask marks the scored targets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from cellsearch.config import option
from cellsearch.tasks.base import Split, encode_text

__all__ = ["SPLITS", "split_seeds", "build_stream", "StreamSizes"]

SPLITS = ("train", "valid", "test")
MAX_TRAIN_TOKENS = 20_000_000
MAX_EVAL_TOKENS = 1_000_000

#: One example: (text, mask flags) where the flags string has '1' at scored targets.
Example = tuple[str, str]


@dataclass(frozen=True)
class StreamSizes:
    """Stream lengths and the data seed shared by every generated task."""

    seed: int = option(20150706, "data seed; each split uses its own child seed", check=lambda s: s >= 0, rule=">= 0")
    # The upper bounds (20 times the paper's streams) keep a task file from asking for hours of generation.
    train_tokens: int = option(500_000, "training stream length (it is cycled when a run needs more)",
                               check=lambda n: 100 <= n <= MAX_TRAIN_TOKENS, rule=f"100..{MAX_TRAIN_TOKENS:_}")
    valid_tokens: int = option(40_000, "held-out stream for the score", check=lambda n: 100 <= n <= MAX_EVAL_TOKENS,
                               rule=f"100..{MAX_EVAL_TOKENS:_}")
    test_tokens: int = option(40_000, "test stream", check=lambda n: 100 <= n <= MAX_EVAL_TOKENS,
                              rule=f"100..{MAX_EVAL_TOKENS:_}")


def split_seeds(seed: int) -> dict[str, int]:
    """Distinct 64-bit seeds for the train, valid and test streams, derived from one data seed."""
    children = np.random.SeedSequence(seed).spawn(len(SPLITS))
    seeds = {name: int(child.generate_state(2, dtype=np.uint64)[0]) for name, child in zip(SPLITS, children)}
    if len(set(seeds.values())) != len(seeds):  # pragma: no cover - a 64-bit collision
        raise RuntimeError(f"split seeds collide for data seed {seed}")
    return seeds


def build_stream(
    make_example: Callable[[random.Random], Example], seed: int, n_tokens: int, vocabulary: tuple[str, ...]
) -> Split:
    """Concatenate examples drawn with ``random.Random(seed)`` until ``n_tokens`` symbols, cut to that length."""
    # A private random.Random instance (not the global one) is the fastest explicit generator for per-symbol draws.
    rng = random.Random(seed)
    texts: list[str] = []
    masks: list[str] = []
    total = 0
    while total < n_tokens:
        text, mask = make_example(rng)
        texts.append(text)
        masks.append(mask)
        total += len(text)
    return encode_text("".join(texts)[:n_tokens], "".join(masks)[:n_tokens], vocabulary)


def build_splits(
    make_example: Callable[[random.Random], Example], sizes: StreamSizes, vocabulary: tuple[str, ...]
) -> dict[str, Split]:
    """The train, valid and test streams of a generated task."""
    seeds = split_seeds(sizes.seed)
    lengths = {"train": sizes.train_tokens, "valid": sizes.valid_tokens, "test": sizes.test_tokens}
    return {name: build_stream(make_example, seeds[name], lengths[name], vocabulary) for name in SPLITS}
