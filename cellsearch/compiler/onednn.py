"""Routing CPU float32 matrix multiplies through oneDNN, only where the numbers are verified.

What torch 2.13 offers: ``torch.backends.mkldnn.matmul.fp32_precision`` (``"ieee"``, ``"tf32"``,
``"bf16"``, or ``"none"`` to inherit ``torch.backends.fp32_precision``). In eager mode a float32
``mm``/``addmm``/``bmm``/``baddbmm`` on the CPU goes to oneDNN only with a *reduced* internal
precision (``bf16``: bfloat16 arithmetic with float32 accumulation; ``tf32``), and only on CPUs that
have the instructions for it (AVX-512 BF16 or AMX for ``bf16``, AMX-FP16 for ``tf32``); with
``"ieee"`` (full float32) the default library (MKL here) always does the work. So "through oneDNN"
always means "with fewer mantissa bits", and whether it happens at all depends on the machine.

:func:`verify_route` therefore decides on the machine, once per process: for each candidate
precision it multiplies the shapes a batched cell uses (``addmm`` and ``baddbmm``) in float32 and
in float64, and keeps the route only when (a) the result differs from the default library's
(otherwise the setting is a no-op here) and (b) its error against float64 stays within
``TOLERANCE_FACTOR`` times the default route's own error. Otherwise the setting is put back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MatmulRouteCheck", "verify_route", "CANDIDATES", "TOLERANCE_FACTOR"]

#: Reduced-precision settings that send float32 matmuls to oneDNN, most precise first.
CANDIDATES = ("tf32", "bf16")
#: A route may be at most this many times less accurate (max error against float64) than the default.
TOLERANCE_FACTOR = 4.0


@dataclass(frozen=True)
class MatmulRouteCheck:
    """The decision: ``route`` (``"default"`` or the precision chosen) and the errors that made it."""

    route: str
    default_error: float
    candidate_errors: dict[str, float | None]  # None: the setting changed nothing on this machine
    reason: str


def _products(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(20150601)
    results = []
    for members, rows, width, columns in ((1, 140, 128, 384), (8, 20, 128, 384)):
        a = torch.randn(members, rows, width, generator=generator, dtype=torch.float64)
        b = torch.randn(members, width, columns, generator=generator, dtype=torch.float64)
        c = torch.randn(members, rows, columns, generator=generator, dtype=torch.float64)
        a, b, c = a.to(dtype), b.to(dtype), c.to(dtype)
        results.append(torch.addmm(c[0], a[0], b[0]))
        results.append(torch.baddbmm(c, a, b))
    return results


def _max_error(results: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((r.double() - e).abs().max() / e.abs().max()) for r, e in zip(results, reference))


def verify_route(mode: str = "auto") -> MatmulRouteCheck:
    """Set ``torch.backends.mkldnn.matmul.fp32_precision`` for this process after a float64 check.

    ``mode``: ``auto`` keeps the first candidate that passes (else the default); ``on`` does the
    same but raises ``RuntimeError`` when none passes; ``off`` sets the default (``"ieee"``).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"mode must be auto, on or off, got {mode!r}")
    backend = torch.backends.mkldnn.matmul
    backend.fp32_precision = "ieee"
    if mode == "off":
        return MatmulRouteCheck("default", float("nan"), {}, "switched off")
    reference = _products(torch.float64)
    default = _products(torch.float32)
    default_error = _max_error(default, reference)
    errors: dict[str, float | None] = {}
    chosen = None
    if torch.backends.mkldnn.is_available():
        for candidate in CANDIDATES:
            backend.fp32_precision = candidate
            results = _products(torch.float32)
            backend.fp32_precision = "ieee"
            if all(torch.equal(r, d) for r, d in zip(results, default)):
                errors[candidate] = None
                continue
            errors[candidate] = _max_error(results, reference)
            if errors[candidate] <= TOLERANCE_FACTOR * default_error:
                chosen = candidate
                break
    if chosen is not None:
        backend.fp32_precision = chosen
        return MatmulRouteCheck(chosen, default_error, errors, f"oneDNN {chosen} verified against float64")
    if not errors:
        reason = "oneDNN is not available in this torch build"
    elif all(error is None for error in errors.values()):
        reason = "no oneDNN float32 route on this CPU (the settings change nothing: the default library runs)"
    else:
        reason = "oneDNN routes exist but fail the float64 check: " + ", ".join(
            f"{name} error {error:.2e} > {TOLERANCE_FACTOR:g} x {default_error:.2e}"
            for name, error in errors.items() if error is not None
        )
    if mode == "on":
        raise RuntimeError(f"CPU matmul route: {reason}")
    return MatmulRouteCheck("default", default_error, errors, reason)
