"""Arithmetic: the sum or difference of two integers of up to 8 digits, read with distractors.

One example is ``3e36d9-h1h39f94eeh43keg3c=-13991064.``: the first number, the
operator and the second number, with a random number (0..``max_distractors``)
of random letters after every input character, then ``=``; the model predicts
the answer and the closing ``.`` one character at a time (teacher forcing). The
answer characters including ``.`` are the scored targets. Vocabulary of 40: 26
letters, 10 digits and ``+ - = .``.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from functools import partial

from cellsearch.config import option
from cellsearch.tasks.base import Task, TaskFile, data_config
from cellsearch.tasks.synthetic import Example, StreamSizes, build_splits

__all__ = ["ArithmeticData", "VOCABULARY", "make_example", "parse_example", "build"]

VOCABULARY = tuple(string.digits) + tuple(string.ascii_lowercase) + ("+", "-", "=", ".")


@dataclass(frozen=True)
class ArithmeticData(StreamSizes):
    max_digits: int = option(
        8, "operands have 1..max_digits digits (paper: 8)", check=lambda n: 1 <= n <= 30, rule="1..30"
    )
    max_distractors: int = option(
        3, "0..N random letters after each input character", check=lambda n: 0 <= n <= 20, rule="0..20"
    )


def _operand(config: ArithmeticData, rng: random.Random) -> int:
    # Uniform digit count first, so that short numbers are as common as long ones.
    digits = rng.randint(1, config.max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def make_example(config: ArithmeticData, rng: random.Random) -> Example:
    """One example and its mask ('1' under every answer character and the final '.')."""
    first, second = _operand(config, rng), _operand(config, rng)
    operator = rng.choice("+-")
    answer = first + second if operator == "+" else first - second
    pieces = []
    for character in f"{first}{operator}{second}":
        pieces.append(character)
        pieces.append(
            "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(0, config.max_distractors)))
        )
    question = "".join(pieces) + "="
    reply = f"{answer}."
    return question + reply, "0" * len(question) + "1" * len(reply)


def parse_example(text: str) -> tuple[int, str, int, int]:
    """(first, operator, second, answer) of one example, read back from its text (used by tests and tools)."""
    question, reply = text.split("=")
    digits_and_operator = "".join(c for c in question if not c.isalpha())
    operator = "+" if "+" in digits_and_operator else "-"
    first, second = digits_and_operator.split(operator)
    return int(first), operator, int(second), int(reply.rstrip("."))


def build(definition: TaskFile, data_dir: str | None = None) -> Task:
    config = data_config(ArithmeticData, definition)
    splits = build_splits(partial(make_example, config), config, VOCABULARY)
    return Task(definition, VOCABULARY, splits, source=f"generated from seed {config.seed}")
