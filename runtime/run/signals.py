"""Stop signals: Ctrl+C (SIGINT) or SIGTERM asks a run to stop after its current step, checkpoint saved.

Every process of a run installs one `StopRequest`. The loop decides how the
request is agreed on: DiLoCo carries the flag in its all-reduce so all
workers stop after the same round; GRPO's and DPO's learner decides alone.
A repeat within 2 s is the same request arriving twice (from the terminal
and from the launcher, which passes it on); a later one raises
KeyboardInterrupt, so a second Ctrl+C stops at once.
"""

from __future__ import annotations

import signal
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self):
        self.requested, self._at = False, 0.0
        self._old = {s: signal.signal(s, self._on_signal) for s in SIGNALS}

    def _on_signal(self, signum, frame):
        if self.requested and time.monotonic() - self._at > 2.0:
            raise KeyboardInterrupt
        self.requested, self._at = True, self._at or time.monotonic()

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
