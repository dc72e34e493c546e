"""Progress bars for long runs (tqdm), silenced in tests and when not wanted."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    """A tqdm bar showing the phase, step, postfix metrics and ETA; a no-op when disabled."""

    def __init__(self, *, total: int, desc: str, initial: int = 0, enabled: bool = True, unit: str = "step"):
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                         file=sys.stderr, leave=True, mininterval=1.0) if enabled else None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def set_description(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.set_description(desc, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
