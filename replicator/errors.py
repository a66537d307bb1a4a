"""The one base class of every error a user (or a peer) can cause.

The CLI catches :class:`DuplexError`, prints ``duplex: error: <message>``
and exits 1; anything else is a bug and keeps its traceback. So a message
must stand on its own: name the file, key, field or value that is wrong,
and what would fix it.
"""
from __future__ import annotations


class DuplexError(Exception):
    """A user-caused error with a message fit to print as is."""
