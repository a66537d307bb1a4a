"""Fixtures for the C core's tests: a resource UUID and a factory for a
device file with its OOS bitmap, activity log and Core, all closed (or
abandoned) at teardown."""
from __future__ import annotations

import os
import uuid as uuid_mod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from replicator.native.actlog import ActivityLog
from replicator.native.bitmap import Bitmap
from replicator.native.core import Core


@pytest.fixture
def res_uuid() -> bytes:
    """A fresh resource UUID."""
    return uuid_mod.uuid4().bytes


@dataclass
class Rig:
    """A device file with its bitmap, activity log and core."""

    dir: Path
    dev: Path
    size: int
    track_size: int
    oos: Bitmap
    al: ActivityLog
    core: Core
    original: bytes

    def device_bytes(self) -> bytes:
        return self.dev.read_bytes()


@pytest.fixture
def make_rig(shm_dir: Path, res_uuid: bytes) -> Iterator[Callable[..., Rig]]:
    """Factory: make_rig(size=1 MiB, track_size=4096, extent_size=64 KiB,
    slots=8, ring_size=16 MiB, first_seq=1, history=False, content="random")."""
    made: list[Rig] = []

    def make(size: int = 1 << 20, track_size: int = 4096, extent_size: int = 64 << 10,
             slots: int = 8, ring_size: int = 16 << 20, first_seq: int = 1,
             history: bool = False, content: str = "random") -> Rig:
        d = shm_dir / f"rig{len(made)}"
        d.mkdir()
        dev = d / "device.img"
        original = os.urandom(size) if content == "random" else bytes(size)
        dev.write_bytes(original)
        nbits = (size + track_size - 1) // track_size
        oos = Bitmap.create(str(d / "oos.bm"), res_uuid, track_size, nbits)
        al = ActivityLog.create(str(d / "al"), res_uuid, extent_size, slots)
        core = Core(str(dev), size, oos, al, ring_size, first_seq,
                    history_path=str(d / "history") if history else None)
        rig = Rig(d, dev, size, track_size, oos, al, core, original)
        made.append(rig)
        return rig

    try:
        yield make
    finally:
        for rig in made:
            rig.core.close(clean=False)
            rig.oos.abandon()
            rig.al.close()
