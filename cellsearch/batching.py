"""The switch for batched training (torch-free, so that configs can name it without importing torch).

:class:`BatchingConfig` is read by :func:`cellsearch.batched_training.train_settings`, by the
search's unit of work (``batching:`` in a search config) and by ``cellsearch train --sample N``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

from cellsearch.config import from_mapping, option, to_mapping

__all__ = ["BatchingConfig"]


@dataclass(frozen=True)
class BatchingConfig:
    """Whether and how settings of one cell train as one batched model."""

    enabled: bool = option(True, "train same-shape settings of a cell as one batched model (results equal, faster)")
    max_members: int = option(20, "largest group trained as one model; larger groups are split", check=lambda n: n >= 1, rule=">= 1")
    when: Literal["pays", "always"] = option(
        "pays", "pays: on a CPU, groups whose softmax layer outweighs their cells train one by one (no gain there); "
        "always: batch every group of two or more"
    )
    onednn: Literal["auto", "on", "off"] = option(
        "auto", "CPU float32 matmuls through oneDNN: auto = only where verified against float64 at start-up"
    )

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BatchingConfig":
        return from_mapping(cls, dict(data))
