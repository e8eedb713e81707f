"""The progress bar of the command-line tools: tqdm on a terminal, plain lines elsewhere."""
from __future__ import annotations

import sys


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def write(self, s: str) -> None:
        print(s)


def progress(total: int, start: int, enabled: bool, unit: str = "step"):
    """A tqdm bar on a terminal's stderr; elsewhere (or disabled) an object with the same methods that only prints
    what is written."""
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit=unit, file=sys.stderr, dynamic_ncols=True)


