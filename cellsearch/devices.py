"""Torch device names as users give them (``--device``, a search config's ``device``): checked in one place.

:func:`is_device_name` checks the spelling only, without importing torch (``top``, ``show`` and
``export`` read a run's config and should not pay torch's seconds of start-up). :func:`check_device`
is what every command taking ``--device`` calls before it loads data or builds a model: a misspelt
name, or a device this machine does not have (``cuda`` on a CPU-only machine or build, ``cuda:3``
with two cards), is one line and exit status 2 rather than a traceback from deep inside training.
Where the runs happen on other machines (a Ray cluster) only the spelling can be checked here.
"""

from __future__ import annotations

import re
from typing import Any

from cellsearch.errors import UserError, shown

__all__ = ["DEVICE_NAME", "is_device_name", "check_device"]

#: Devices torch knows, as torch spells them, optionally with an index.
DEVICE_NAME = re.compile(r"(cpu|cuda|mps|xpu|hip|xla|hpu|mtia|privateuseone)(:\d{1,4})?")


def is_device_name(value: Any) -> bool:
    """Whether ``value`` is spelt like a torch device (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...)."""
    return isinstance(value, str) and DEVICE_NAME.fullmatch(value) is not None


def check_device(value: Any, here: bool = True, option: str = "--device") -> str:
    """``value`` if it names a torch device (with ``here``: one this machine can use), else :class:`UserError`."""
    if not is_device_name(value):
        raise UserError(f"{option}: {shown(value)} is not a torch device (cpu, cuda, cuda:1, mps, ...)")
    if not here:
        return value
    import torch

    device = torch.device(value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device is visible"
            raise UserError(f"{option} {value}: CUDA is not available on this machine ({build})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"{option} {value}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{option} {value}: MPS is not available on this machine")
    try:
        # The general test, for every other kind: can a tensor live there?
        torch.empty(0, device=device)
    except Exception as error:  # torch raises RuntimeError, AssertionError or its own kinds here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{option} {value}: not usable on this machine ({reason[:160]})") from None
    return value
