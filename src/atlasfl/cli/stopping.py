"""Ctrl-C and SIGTERM for a command: the first stops cleanly, the second at once."""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atlasfl.engine.simulation import StopFlag


def install_stop_handlers() -> StopFlag:
    """First SIGINT/SIGTERM: stop at the next client boundary; a second one: stop now."""
    from atlasfl.engine.simulation import StopFlag

    stop = StopFlag()

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        print(f"\natlasfl: {signal.Signals(signum).name} received: stopping after the current "
              f"client and keeping the last complete checkpoint (again to stop at once)",
              file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop
