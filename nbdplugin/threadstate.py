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

# thread ident -> what PyGILState_Ensure returned. Not threading.local:
# that lives in the thread state, which is what is being kept alive.
_pinned: dict[int, int] = {}


def pin() -> None:
    """Keep this thread's Python thread state until unpin()."""
    tid = threading.get_ident()
    if tid not in _pinned and len(_pinned) < MAX_PINNED:
        _pinned[tid] = _ensure()


def unpin() -> None:
    """Let this thread's state go when the current callback returns."""
    state = _pinned.pop(threading.get_ident(), None)
    if state is not None:
        _release(state)
