"""One Metadata object shared by threads: changes and saves are one step
under its lock, and concurrent saves never fail or leave a torn file."""
from __future__ import annotations

import threading

from replicator.fileio import atomic_write
from replicator.metadata import create_metadata, load_metadata

THREADS = 8
SAVES = 200


def test_metadata_saved_from_8_threads_200_times_reloads_valid_every_time(shm_dir):
    tmp_path = shm_dir
    md = create_metadata(tmp_path, "r0", "alpha", 1 << 20, 64 << 10, assume_clean=True)
    errors: list[BaseException] = []
    loaded: list[list[int]] = [[], []]
    stop = threading.Event()

    def saver() -> None:
        try:
            for _ in range(SAVES):
                with md.update():
                    md.seq_hwm += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def reader(seen: list[int]) -> None:
        try:
            while not stop.is_set():
                seen.append(load_metadata(tmp_path, "r0", "alpha").seq_hwm)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    readers = [threading.Thread(target=reader, args=(seen,)) for seen in loaded]
    savers = [threading.Thread(target=saver) for _ in range(THREADS)]
    for t in readers + savers:
        t.start()
    for t in savers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    assert load_metadata(tmp_path, "r0", "alpha").seq_hwm == THREADS * SAVES
    for seen in loaded:
        assert seen and seen == sorted(seen), "a reader saw the mark go backwards"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json"], "temporary files left"


def test_atomic_write_from_many_threads_never_renames_another_threads_file(shm_dir):
    target = shm_dir / "report.json"
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for _ in range(100):
                atomic_write(target, b"%d\n" % i * 1000)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = target.read_bytes()
    assert len(set(data.split(b"\n")) - {b""}) == 1, "a torn or mixed file"


def test_a_failed_update_block_saves_nothing(tmp_path):
    md = create_metadata(tmp_path, "r0", "alpha", 1 << 20, 64 << 10, assume_clean=True)
    try:
        with md.update():
            raise ValueError("check failed before any field was set")
    except ValueError:
        pass
    assert load_metadata(tmp_path, "r0", "alpha").updated == md.updated
