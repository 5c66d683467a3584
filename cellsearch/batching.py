"""The switch for batched training (torch-free, so that configs can name it without importing torch).

:class:`BatchingConfig` is read by :func:`cellsearch.training.groups.train_settings`, by the
search's unit of work (``batching:`` in a search config) and by ``cellsearch train --sample N``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

from cellsearch.config import from_mapping, option, to_mapping

__all__ = ["BatchingConfig", "CPU_COMPILE_MAX_WIDTH", "AUTO_MIN_CAP_SECONDS"]

#: The widest hidden width at which a compiled batched step was measured faster than the eager one
#: on a CPU (1.37x at 32, 0.96x at 64; see :meth:`BatchingConfig.compile_decision`).
CPU_COMPILE_MAX_WIDTH = 32
#: The shortest wall-clock cap under which ``compile: auto`` compiles: a compilation took 118-243 s,
#: and the best measured gain (1.37x for a batched model) saves about a quarter of each step, so a
#: compilation needs several times its own duration of training after it to pay.
AUTO_MIN_CAP_SECONDS = 1800


@dataclass(frozen=True)
class BatchingConfig:
    """Whether and how settings of one cell train as one batched model."""

    enabled: bool = option(True, "train same-shape settings of a cell as one batched model (results equal, faster)")
    max_members: int = option(20, "largest group trained as one model; larger groups are split",
                              check=lambda n: n >= 1, rule=">= 1")
    when: Literal["pays", "always"] = option(
        "pays", "pays: on a CPU, groups whose softmax layer outweighs their cells train one by one (no gain there); "
        "always: batch every group of two or more"
    )
    onednn: Literal["auto", "on", "off"] = option(
        "auto", "CPU float32 matmuls through oneDNN: auto = only where verified against float64 at start-up"
    )
    compile: Literal["off", "auto", "on"] = option(
        "auto", "training step through torch.compile (CUDA: CUDA graphs): auto = only where measured faster: groups "
        "planned to run at least compile_min_steps steps on a CPU at widths <= 32 (not yet on CUDA: unmeasured); "
        "on = always; off = never"
    )
    compile_min_steps: int = option(
        30_000, "with compile: auto, the planned steps from which compiling a group pays (compile seconds / seconds "
        "saved per step; measured on a CPU, see compile_decision)", check=lambda n: n >= 1, rule=">= 1"
    )

    def compile_decision(self, device_type: str, planned_steps: int, hidden_size: int,
                         max_seconds: float | None = None) -> tuple[bool, str]:
        """Whether a group of ``planned_steps`` training steps of width ``hidden_size`` on ``device_type`` runs
        compiled, and why.

        ``on`` and ``off`` decide alone. ``auto`` compiles a group planned to run at least
        ``compile_min_steps`` steps (``max_epochs * steps_per_epoch``, capped by ``max_steps``)
        whose wall-clock cap ``max_seconds``, if any, is at least :data:`AUTO_MIN_CAP_SECONDS`, on a
        CPU at widths up to :data:`CPU_COMPILE_MAX_WIDTH` (32), and not on CUDA (see below): compilation
        (:mod:`cellsearch.training.capture`) costs minutes per cell and shape, paid again in every
        process and for every cell, and must be earned back by faster steps.

        The figures behind the rule (``benchmarks/batched.py``, CPU, one thread, torch 2.13, gru,
        vocabulary 64, window 35 x 20, a shared 2-core machine at load average 1-5; per-member steps
        per second, process-CPU-clock medians of 5 interleaved repeats, compiled / eager; width 8
        from a one-repeat trial run):

        ======  ===  ============  =============  ================================
        width    K   single model  batched model  steps to pay for the compilation
        ======  ===  ============  =============  ================================
             8    2  1.96x         1.79x          about 28,000 (single and batched)
            32    8  1.69x         1.37x          22,400 single, 13,900 batched
            64    8  1.59x         0.96x          34,200 single, never batched
            64   20  1.60x         0.96x          never batched
           256    8  0.98x         0.73x          never
           256   20  0.87x         0.61x          never
        ======  ===  ============  =============  ================================

        One compilation (the first step, forward and backward) took 118-243 s (median 153 s over
        the 6 of the main run). Batched models (the search's case, and the one wired here) gain on
        a CPU up to width 32 and lose from 64 on; hence the CPU width cap. Part of the loss at
        larger widths: the compiled backward computes the step matrices' gradients step by step,
        where eager defers them to one large multiply; eagerly, per-step gradients cost 1.04x
        (width 64) and 1.18x (width 256) of the deferred ones at K 8, less than the compiled step
        loses (the rest was not analysed). The threshold of 30,000 planned steps is above the
        measured pay-back points, with room for runs that the decay stops early.

        Planned steps per task (smoke / small / paper): memorize 10 / 800 / 25,000, arithmetic and
        xml 10 / 300 / 100,000, ptb 8 / 50 / 53,120; so every smoke and small unit, and every test,
        stays uncompiled on any device. On CUDA, CUDA graphs remove the kernel-launch overhead that
        dominates small recurrent steps there, so the saving per step should be larger; but that path
        has not run on a GPU yet (none was available), so ``auto`` leaves it off there: ``compile: on``
        runs it, and ``benchmarks/batched.py --device cuda`` measures it.
        """
        if self.compile == "off":
            return False, "compile: off"
        if self.compile == "on":
            return True, "compile: on"
        if planned_steps < self.compile_min_steps:
            return False, f"compile: auto, {planned_steps} planned steps < compile_min_steps {self.compile_min_steps}"
        if max_seconds is not None and max_seconds < AUTO_MIN_CAP_SECONDS:
            return False, f"compile: auto, a wall-clock cap of {max_seconds:g} s < {AUTO_MIN_CAP_SECONDS} s"
        if device_type == "cuda":
            return False, "compile: auto, not on CUDA until measured there (compile: on runs it)"
        if hidden_size > CPU_COMPILE_MAX_WIDTH:
            return False, (f"compile: auto, width {hidden_size} > {CPU_COMPILE_MAX_WIDTH} on {device_type} "
                           f"(compiled batched steps were slower there)")
        return True, f"compile: auto, {planned_steps} planned steps >= compile_min_steps {self.compile_min_steps}"

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BatchingConfig":
        return from_mapping(cls, dict(data))
