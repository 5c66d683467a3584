"""Progress of a long command on stderr: a tqdm bar, or with ``--no-progress`` one log line per event.

The bar is drawn on a terminal only: where stderr is a file or a pipe (a log, a test, a CI job) a
bar's carriage returns would garble it, so there, as with ``--no-progress``, each event is one
log line, and a command refused before it started writes its one error line and nothing else.
The bar shows ``done/total``, the rate and the ETA under a short description (as ``search``'s bar);
it appears at once, before the total is known ("planning"; erased again if the command stops
before that), and the rate counts only what this command did (work finished by an earlier,
resumed start is its initial count). The log lines: one per finished item
(``retrain: 3/8 runs done (gru seed 1: ok, ...)``), and at the start one for the work an earlier
start finished (``retrain: 2/8 runs done (2 finished before)``), if any.
Lines written through :meth:`CommandProgress.write` go above the bar, or are plain lines without one.
"""

from __future__ import annotations

import sys

__all__ = ["CommandProgress"]


def _interactive() -> bool:
    """Whether stderr is a terminal (where a bar can redraw itself)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class CommandProgress:
    """``command``'s progress over ``units`` (a plural noun: runs, units, steps); ``enabled=False``: log lines."""

    def __init__(self, command: str, units: str, enabled: bool = True, description: str = "planning"):
        self.command = command
        self.units = units
        self.total: int | None = None
        self.done = 0
        self._bar = None
        if enabled and _interactive():
            from tqdm import tqdm

            self._bar = tqdm(total=None, desc=f"{command}: {description}", unit=units.rstrip("s") or units,
                             dynamic_ncols=True, mininterval=1.0, file=sys.stderr, smoothing=0.1)

    @property
    def enabled(self) -> bool:
        """Whether a bar is shown (not with ``--no-progress``, nor off a terminal, nor once closed)."""
        return self._bar is not None

    @staticmethod
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        """A line of its own: above the bar, or a plain line."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            self.log(message)

    def start(self, total: int, done: int = 0, note: str | None = None) -> None:
        """The total is known: ``done`` of ``total`` were finished before (not counted in the rate)."""
        self.total, self.done = total, done
        if self._bar is not None:
            bar = self._bar
            bar.set_description_str(self.command, refresh=False)
            bar.reset(total)
            bar.n = bar.last_print_n = bar.initial = done
            if note:
                bar.set_postfix_str(note, refresh=False)
            bar.refresh()
        elif done:  # nothing to say before the first item finishes: a refused run stays one error line
            self.log(f"{self.command}: {done}/{total} {self.units} done" + (f" ({note})" if note else ""))

    def advance(self, done: int | None = None, note: str | None = None) -> None:
        """Progress to ``done`` (default: one more), with a note on the event (the run that finished)."""
        done = self.done + 1 if done is None else done
        self.done = max(self.done, done)
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(max(0, done - self._bar.n))
        else:
            total = "?" if self.total is None else self.total
            self.log(f"{self.command}: {done}/{total} {self.units} done" + (f" ({note})" if note else ""))

    def tick(self) -> None:
        """Redraw the bar (elapsed time) if it is due, between events (e.g. on every training step)."""
        if self._bar is not None:
            self._bar.update(0)

    def close(self) -> None:
        if self._bar is not None:
            if self.total is None:  # stopped before the total was known (a refused command): no bar is left
                self._bar.leave = False
            self._bar.close()
            self._bar = None

    def __enter__(self) -> CommandProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
