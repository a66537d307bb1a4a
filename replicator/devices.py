"""Sizes of the things Duplex replicates: regular image files and block
devices alike."""
from __future__ import annotations

import fcntl
import os
import stat
import struct

from replicator.errors import DuplexError

BLKGETSIZE64 = 0x80081272  # <linux/fs.h>: _IOR(0x12, 114, size_t)


def device_size(path: str) -> int:
    """Size in bytes of a block device or regular file; DuplexError if unusable."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DuplexError(f"device {path} does not exist") from None
    except OSError as e:
        raise DuplexError(f"device {path}: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        size = st.st_size
    elif stat.S_ISBLK(st.st_mode):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DuplexError(f"device {path}: cannot open: {e.strerror}") from None
        try:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            size = struct.unpack("Q", buf)[0]
        except OSError:
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    else:
        raise DuplexError(f"device {path} is neither a block device nor a regular file")
    if size == 0:
        raise DuplexError(f"device {path} is empty (size 0)")
    if size % 512:
        raise DuplexError(f"device {path} is {size} bytes, not a multiple of 512")
    return size
