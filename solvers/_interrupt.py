"""Ctrl-C during a back-end's solve: stop the back-end, then raise KeyboardInterrupt.

Back-ends run their search in C++ with the GIL released and would otherwise swallow SIGINT (CP-SAT and SCIP
catch it themselves, stop, and return a normal-looking status). Wrap the solve call::

    solver.parameters.catch_sigint_signal = False          # CP-SAT: let the signal reach Python
    with interruptible(solver.stop_search):
        code = solver.solve(model)

While the block runs, SIGINT is recorded and ``stop()`` is called from a watcher thread (woken through
``signal.set_wakeup_fd``, so it runs even while the main thread is inside C++), again every 50 ms until the block
ends (a signal that arrives just before the back-end starts still stops it). When the block ends,
KeyboardInterrupt is raised. Outside the main thread (where Python cannot install signal handlers) the block runs
unchanged.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator

__all__ = ["interruptible"]

_POLL_S = 0.05


@contextlib.contextmanager
def interruptible(stop: Callable[[], object] | None = None) -> Iterator[None]:
    """Run the block; on SIGINT call ``stop`` (if given) and raise KeyboardInterrupt once the block returns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit = threading.Event()
    done = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:  # runs in the main thread, between bytecodes
        hit.set()

    reader, writer = socket.socketpair()
    reader.settimeout(_POLL_S)
    writer.setblocking(False)

    def watch() -> None:
        while not done.is_set():
            try:
                data = reader.recv(64)
            except (TimeoutError, BlockingIOError):
                data = b""
            except OSError:
                return
            if signal.SIGINT in data:
                hit.set()
            if hit.is_set() and stop is not None and not done.is_set():
                with contextlib.suppress(Exception):  # a back-end that is not running yet, or finished
                    stop()

    previous = signal.signal(signal.SIGINT, on_sigint)
    old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="moebalance-interrupt", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGINT, previous)
        with contextlib.suppress(OSError):
            writer.send(b"\0")  # wake the watcher now rather than at its next poll (50 ms a block otherwise)
        watcher.join()
        reader.close()
        writer.close()
        if hit.is_set():  # also replaces an error the stopped back-end raised
            raise KeyboardInterrupt
