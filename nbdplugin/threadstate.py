"""Keep one Python thread state per nbdkit connection thread.

nbdkit's Python plugin wraps every callback in PyGILState_Ensure/Release.
On a thread Python did not create, that makes a fresh PyThreadState for
each request and deletes it afterwards: an mmap and a munmap of its frame
stack (with a TLB shootdown to every other CPU the process runs on, e.g.
the shipper's) and page faults, per request. Taking one more reference on
the thread state the first time a thread calls in keeps it alive across
requests; the connection's close() drops it again.

Only the GIL-holding thread calls these (from inside a callback), and
ctypes.pythonapi does not release the GIL.
"""
from __future__ import annotations

import ctypes
import threading

_ensure = ctypes.pythonapi.PyGILState_Ensure
_ensure.restype = ctypes.c_int
_release = ctypes.pythonapi.PyGILState_Release
_release.argtypes = [ctypes.c_int]

MAX_PINNED = 256  # a bound, in case some thread never sees its close()
# Off under nbdkit's parallel thread model: there requests run on worker
# threads that end with their connection (never calling close()), so their
# pins would only leak; the plugin turns it off.
enabled = True

# thread ident -> what PyGILState_Ensure returned (for the tests and the
# bound). Whether *this* thread holds a pin is in _local: a thread ident is
# reused once its thread has ended, so a stale entry under it must never be
# taken for the new thread's own (releasing another thread's state crashes
# the interpreter). threading.local lives in the thread state, which lives
# exactly as long as the pin does: a thread without one sees nothing there.
_pinned: dict[int, int] = {}
_local = threading.local()


def pin() -> None:
    """Keep this thread's Python thread state until unpin()."""
    if not enabled or getattr(_local, "state", None) is not None:
        return
    if len(_pinned) < MAX_PINNED:
        state = _ensure()
        _local.state = state
        _pinned[threading.get_ident()] = state


def unpin() -> None:
    """Let this thread's state go when the current callback returns."""
    state = getattr(_local, "state", None)
    if state is None:
        return
    _local.state = None
    _pinned.pop(threading.get_ident(), None)
    _release(state)
