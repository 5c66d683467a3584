"""Random streams of a search, all derived from the run seed.

No global RNG: every stream is ``numpy.random.SeedSequence(run_seed,
spawn_key=(STREAM, *keys))`` for a stream kind and integer keys that are
stored in the database (a step number, a trial number, a cell hash). A resumed
search therefore draws exactly what the interrupted one would have drawn for
the same step, and a re-run unit trains with the same seeds.
"""

from __future__ import annotations

import numpy as np

__all__ = ["STEP_STREAM", "SAMPLER_STREAM", "TRAIN_STREAM", "CONFIRM_STREAM", "generator", "derived_seed",
           "hash_key"]

#: What a step decides: re-evaluate or mutate, the parent, the mutation.
STEP_STREAM = 1
#: Seeds of the Optuna sampler used to plan one stage of a step.
SAMPLER_STREAM = 2
#: Training seeds of individual settings.
TRAIN_STREAM = 3
#: The fresh seeds of a confirmation, shared by the candidate and the reference cell (paired runs).
CONFIRM_STREAM = 4


def _sequence(run_seed: int, stream: int, keys: tuple[int, ...]) -> np.random.SeedSequence:
    return np.random.SeedSequence(run_seed, spawn_key=(stream, *(int(k) for k in keys)))


def generator(run_seed: int, stream: int, *keys: int) -> np.random.Generator:
    """An independent generator for ``(stream, *keys)`` under ``run_seed``."""
    return np.random.Generator(np.random.PCG64(_sequence(run_seed, stream, keys)))


def derived_seed(run_seed: int, stream: int, *keys: int) -> int:
    """A 31-bit integer seed (for torch and Optuna) for ``(stream, *keys)`` under ``run_seed``."""
    return int(_sequence(run_seed, stream, keys).generate_state(1, dtype=np.uint32)[0] >> 1)


def hash_key(cell_hash: str) -> int:
    """An integer key for a cell (the first 60 bits of its hash)."""
    return int(cell_hash[:15], 16)
