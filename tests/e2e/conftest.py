"""Fixtures of the end-to-end tests: a Duplex pair in two namespaces."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from fixtures.duplex_lab import Lab


@pytest.fixture
def make_lab(netns_pair, procs, tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    """Factory: a Lab (config, images, metadata dirs) between the two
    namespaces of ``netns_pair``; its processes stop at teardown."""
    labs: list[Lab] = []

    def make(**kwargs) -> Lab:
        lab = Lab(tmp_path / f"lab{len(labs)}", procs, netns_pair.ns_a, netns_pair.ns_b,
                  netns_pair.addr_a, netns_pair.addr_b, **kwargs)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.stop()
            lab.sock.unlink(missing_ok=True)
