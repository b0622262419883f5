"""Ctrl-C during a batch: the first finishes the documents in progress, the second abandons them.

Either way the loop stops with every finished document already saved. SIGTERM counts as Ctrl-C.
"""

import signal
import sys
import threading
from contextlib import contextmanager


class StopRequest:
    """Set by the first SIGINT/SIGTERM; a second one raises KeyboardInterrupt where the code is."""

    def __init__(self, *, announce: bool = True):
        self.requested = False
        self.announce = announce
        self._deferring = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if self._deferring:
                return
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nfacli: stopping after the documents in progress; press Ctrl-C again to abandon them",
                  file=sys.stderr, flush=True)

    @contextmanager
    def deferred(self):
        """While a record is saved, a second signal only asks to stop (the record completes)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    @contextmanager
    def installed(self):
        """Handle SIGINT and SIGTERM while the block runs (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
