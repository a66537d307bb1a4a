"""nbdkit + nbdfuse + losetup gives a real block device to mkfs and mount."""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Callable

from fixtures.blockdev import LoopDevice, attach_loop, mkfs, mounted, mountpoints_of
from fixtures.images import make_sparse_image
from fixtures.leaks import leftovers
from fixtures.nbdkit import NbdkitServer, start_nbdkit
from fixtures.processes import ProcessGroup

EXT4_MAGIC_OFFSET = 1024 + 0x38  # superblock at 1024, s_magic at 0x38
EXT4_MAGIC = 0xEF53


def _ext4_magic(image: Path) -> int:
    with open(image, "rb") as f:
        f.seek(EXT4_MAGIC_OFFSET)
        return struct.unpack("<H", f.read(2))[0]


def test_ext4_on_nbd_loop_device_lands_in_the_image_and_leaves_nothing(tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "disk.img", 64 * 1024 * 1024)
    payload = os.urandom(300 * 1024)
    with ProcessGroup(tmp_path / "logs") as group:
        server = start_nbdkit(group, "file", [str(image)], workdir=tmp_path / "run")
        dev = attach_loop(group, server.uri, tmp_path / "fuse")
        try:
            assert dev.path.startswith("/dev/loop")
            assert dev.size() == 64 * 1024 * 1024
            during = leftovers(tmp_path)
            assert during.loop_devices == (dev.path,)
            assert len(during.fuse_mounts) == 1
            mkfs(dev.path, "ext4")
            with mounted(dev.path, tmp_path / "mnt") as mnt:
                (mnt / "hello.bin").write_bytes(payload)
                assert mountpoints_of(dev.path) == [str(mnt)]
            assert mountpoints_of(dev.path) == []
            # Mounted again: the file came back through the whole chain.
            with mounted(dev.path, tmp_path / "mnt", options=("ro",)) as mnt:
                assert (mnt / "hello.bin").read_bytes() == payload
        finally:
            dev.detach()
        server.stop()
    assert _ext4_magic(image) == EXT4_MAGIC
    left = leftovers(tmp_path)
    assert left.is_empty(), f"left behind: {left}"


def test_detach_unmounts_a_filesystem_the_test_left_mounted(tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "disk.img", 320 * 1024 * 1024)  # XFS minimum: 300 MB
    with ProcessGroup(tmp_path / "logs") as group:
        server = start_nbdkit(group, "file", [str(image)], workdir=tmp_path / "run")
        dev = attach_loop(group, server.uri, tmp_path / "fuse")
        try:
            mkfs(dev.path, "xfs")
            mnt = tmp_path / "mnt"
            mnt.mkdir()
            os.system(f"mount {dev.path} {mnt}")  # deliberately not through mounted()
            assert mountpoints_of(dev.path) == [str(mnt)]
        finally:
            dev.detach()
    assert leftovers(tmp_path).is_empty()
    assert image.read_bytes()[:4] == b"XFSB"


def test_fixtures_give_a_mounted_filesystem(nbdkit_server: Callable[..., NbdkitServer],
                                            nbd_block_device: Callable[..., LoopDevice],
                                            mount_fs: Callable[..., Path],
                                            sparse_image: Callable[..., Path]) -> None:
    image = sparse_image(32 * 1024 * 1024)
    dev = nbd_block_device(nbdkit_server("file", str(image)).uri)
    mnt = mount_fs(dev.path, "ext4")
    (mnt / "a.txt").write_text("written through nbdkit\n")
    os.sync()
    assert _ext4_magic(image) == EXT4_MAGIC
