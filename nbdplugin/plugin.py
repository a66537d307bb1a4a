"""nbdkit Python plugin for the Duplex primary: callbacks only.

Every data callback is one call into the engine, which is one call into the
C core with the GIL released (DESIGN §3). Capabilities say exactly what the
engine guarantees: FUA (native: fdatasync inside the core), trim and zero
(both leave zeros on both sides), flush, and multi-conn (one sequencer
serves every connection, and flush syncs every volume).

Volumes (DESIGN §8): one nbdkit process serves every volume of the
resource as its own export, named by the volume name (``list_exports``);
the default export "" is the first volume (``default_export``), so a
plain-``device`` resource is served at "" exactly as before (its one
volume is also listed by its name, "default"). ``open`` resolves the
client's export name to a volume index, which is the connection's handle:
every data callback is still ONE engine call, passing that index. An
unknown name fails the open with ENOENT and one log line naming the
volumes; the client gets an NBD error, the server goes on.

    nbdkit python plugin.py config=/etc/duplex/duplex.toml resource=r0 node=alpha
"""
import errno
import logging
import os
import sys

import nbdkit

from nbdplugin import threadstate
from replicator.node import STARTUP_ERROR_FD_ENV, setup_logging
from replicator.errors import DuplexError
from replicator.primary.engine import Engine

API_VERSION = 2

_params: dict[str, str] = {}
_engine: Engine | None = None


def _startup_failed(e: BaseException) -> None:
    """A startup error is the user's to fix, not a bug: one line, no
    traceback (nbdkit prints a Python traceback for any exception a
    callback raises). ``duplex up`` passes a pipe for the line and prints
    it itself; run by hand, the line goes to stderr as nbdkit's own errors
    do. Then nbdkit exits: before it serves (get_ready) nothing is lost."""
    if isinstance(e, OSError):
        from replicator.control import describe_oserror
        msg = describe_oserror(e)
    elif isinstance(e, DuplexError):
        msg = str(e)
    else:  # a bug: the traceback goes to the debug log, the user gets one line
        logging.getLogger("duplex").debug("plugin startup failed", exc_info=e)
        msg = (f"internal error: {type(e).__name__}: {e} (a bug; DUPLEX_LOG=DEBUG "
               f"logs the traceback)")
    line = (" ".join(msg.split()) or type(e).__name__) + "\n"
    fd = os.environ.get(STARTUP_ERROR_FD_ENV, "")
    try:
        if fd.isdigit():
            os.write(int(fd), line.encode("utf-8", "replace"))
        else:
            sys.stderr.write(f"nbdkit: duplex: error: {line}")
            sys.stderr.flush()
    finally:
        os._exit(1)


def config(key: str, value: str) -> None:
    if key not in ("config", "resource", "node", "history", "threads"):
        _startup_failed(DuplexError(
            f"duplex plugin: unknown parameter {key!r} "
            "(expected config=, resource=, node=, history=, threads=)"))
    _params[key] = value


def config_complete() -> None:
    fd = os.environ.get(STARTUP_ERROR_FD_ENV, "")
    if fd.isdigit():  # not for the engine's children: the pipe is nbdkit's
        try:
            os.set_inheritable(int(fd), False)
        except OSError:
            os.environ.pop(STARTUP_ERROR_FD_ENV, None)  # not open: report on stderr
    for key in ("config", "resource", "node"):
        if key not in _params:
            _startup_failed(DuplexError(f"duplex plugin: missing parameter {key}="))
    setup_logging(_params["resource"], _params["node"])


def thread_model() -> int:
    # Serialised requests measured faster than PARALLEL on 2 cores with cffi
    # calls (GIL hand-offs); the shipper still runs while the C call has
    # the GIL released.  threads=parallel lets benchmarks compare.
    if _params.get("threads") == "parallel":
        threadstate.enabled = False  # worker threads end unpinned: see threadstate
        return nbdkit.THREAD_MODEL_PARALLEL
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def get_ready() -> None:
    global _engine
    try:
        _engine = Engine.open(_params["config"], _params["resource"], _params["node"],
                              history_path=_params.get("history"))
    except Exception as e:  # noqa: BLE001 (nbdkit would print a traceback)
        _startup_failed(e)


def after_fork() -> None:
    # Threads must start here, not in get_ready (DESIGN §10).
    assert _engine is not None
    try:
        _engine.start()
    except Exception as e:  # noqa: BLE001 (nbdkit would print a traceback)
        _startup_failed(e)


def cleanup() -> None:
    # nbdkit calls this once every client has gone (`duplex up` bounds that
    # wait and then disconnects them: replicator/exportuse.py). A failing
    # stop is logged, never a silent hang; the activity log covers what it
    # could not make durable. The device claim goes in any case.
    if _engine is None:
        return
    import logging
    log = logging.getLogger("duplex.primary")
    try:
        _engine.stop()
    except (OSError, DuplexError) as e:
        log.error("%s: the clean stop failed: %s; the next start recovers from the "
                  "activity log", _engine.resource.name, e)
    except Exception:  # a bug: its traceback belongs in the log
        log.exception("%s: the clean stop failed", _engine.resource.name)
    finally:
        if _engine.claim is not None:
            _engine.claim.close()


def list_exports(readonly: bool, is_tls: bool) -> list[str]:
    """Every volume, in config order (NBD_OPT_LIST)."""
    return list(_engine.layout.names)


def default_export(readonly: bool, is_tls: bool) -> str:
    """What export "" means: the first volume."""
    return _engine.layout.names[0]


class UnknownExport(Exception):
    """A client asked for an export that is no volume of the resource."""


def open(readonly: bool) -> int:
    """The handle is the volume index of the export the client asked for."""
    name = nbdkit.export_name()
    if name == "":
        return 0
    names = _engine.layout.names
    try:
        return names.index(name)
    except ValueError:
        pass
    nbdkit.set_error(errno.ENOENT)
    # Untrusted client text: shown with repr, bounded.
    raise UnknownExport(f"{_engine.resource.name}: no volume {name[:64]!r}: the exports are "
                        + ", ".join(repr(n) for n in names))


def close(h: int) -> None:
    threadstate.unpin()


def get_size(h: int) -> int:
    return _engine.volume_size(h)


def block_size(h: int):
    return (1, 4096, 32 * 1024 * 1024)


def can_write(h: int) -> bool:
    return True


def can_flush(h: int) -> bool:
    return True


def can_fua(h: int) -> int:
    return nbdkit.FUA_NATIVE


def can_trim(h: int) -> bool:
    return True


def can_zero(h: int) -> bool:
    return True


def can_fast_zero(h: int) -> bool:
    return False


def can_multi_conn(h: int) -> bool:
    return True


def can_cache(h: int) -> int:
    return nbdkit.CACHE_NONE


def _fail(e: OSError) -> None:
    nbdkit.set_error(e.errno or errno.EIO)
    raise e


def pread(h: int, buf, offset: int, flags: int) -> None:
    threadstate.pin()
    try:
        _engine.pread_into(buf, offset, h)
    except OSError as e:
        _fail(e)


def pwrite(h: int, buf, offset: int, flags: int) -> None:
    threadstate.pin()
    try:
        _engine.write(buf, offset, bool(flags & nbdkit.FLAG_FUA), h)
    except OSError as e:
        _fail(e)


def flush(h: int, flags: int) -> None:
    # Whichever export it comes on, a flush covers every volume.
    try:
        _engine.flush()
    except OSError as e:
        _fail(e)


def trim(h: int, count: int, offset: int, flags: int) -> None:
    try:
        _engine.trim(offset, count, bool(flags & nbdkit.FLAG_FUA), h)
    except OSError as e:
        _fail(e)


def zero(h: int, count: int, offset: int, flags: int) -> None:
    try:
        _engine.zero(offset, count, bool(flags & nbdkit.FLAG_FUA), h)
    except OSError as e:
        _fail(e)
