"""Log records to the systemd journal, with the resource and node as fields.

Under a unit, systemd connects stderr to the journal and says so in
``$JOURNAL_STREAM`` (``DEVICE:INODE`` of that stream). Plain lines there
carry no structure; sent through the journal's native protocol instead,
every record gets ``DUPLEX_RESOURCE`` and ``DUPLEX_NODE`` fields, so
``journalctl DUPLEX_RESOURCE=r0`` shows one resource's lines from the
``duplex up`` process and from nbdkit's plugin under it, and the priority
follows the log level. The protocol is python3-systemd's ``JournalHandler``
(Debian's package; the virtualenv sees it through system site-packages).

Anywhere else -- a terminal, a test capturing stderr, a unit whose stderr
was redirected elsewhere (``$JOURNAL_STREAM`` then names another stream) --
logging stays plain lines on stderr, as before.
"""
from __future__ import annotations

import logging
import os
import sys

#: The SYSLOG_IDENTIFIER of every record (``journalctl -t duplex``).
IDENTIFIER = "duplex"


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd gave this service
    (``$JOURNAL_STREAM`` names its device and inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # no stderr, or a replaced one
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def journal_handler(resource: str | None, node: str | None) -> logging.Handler | None:
    """A handler sending records to the journal with the resource and node
    as fields, or None when stderr is not the journal or python3-systemd
    is missing (then plain stderr stays: a line without fields beats none)."""
    if not stderr_is_journal():
        return None
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    fields = {"SYSLOG_IDENTIFIER": IDENTIFIER}
    if resource:
        fields["DUPLEX_RESOURCE"] = resource
    if node:
        fields["DUPLEX_NODE"] = node
    handler = JournalHandler(**fields)
    # The journal stamps time and priority itself: the logger name and the text.
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    return handler


def use_journal(resource: str | None, node: str | None) -> bool:
    """Replace the root logger's stderr handlers by the journal handler when
    stderr is the journal (see :func:`journal_handler`). True if it did."""
    handler = journal_handler(resource, node)
    if handler is None:
        return False
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, logging.StreamHandler) and \
                getattr(old, "stream", None) in (sys.stderr, sys.__stderr__):
            root.removeHandler(old)
    root.addHandler(handler)
    return True
