"""cffi build script for the C core: API mode, out-of-line, module
replicator._core.

setup.py names it (cffi_modules=["native/build_core.py:ffibuilder"]), so
`pip install -e .` builds replicator/_core*.so. Run it directly to build
the module in place without pip: `python native/build_core.py`.

Paths are taken from this file's location, so it works from any cwd.
cffi releases the GIL around every call into the core: the write path is
one C call per request, with the GIL released.
"""
from __future__ import annotations

import os
import re
import sys

from cffi import FFI

NATIVE_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT_DIR = os.path.dirname(NATIVE_DIR)
MODULES = ["crc32c", "bitmap", "actlog", "ring", "flow", "collide", "records", "rxq", "core", "ship"]


def _native_path(name: str, absolute: bool) -> str:
    """A file in native/. setuptools refuses absolute source paths and
    resolves relative ones from the cwd (the project root under pip);
    cffi's own compile() changes directory, so it needs absolute ones."""
    path = os.path.join(NATIVE_DIR, name)
    return path if absolute else os.path.relpath(path)


def make_builder(absolute: bool = False) -> FFI:
    """The FFI builder for replicator._core."""
    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "replicator._core",
        "\n".join(f'#include "{m}.h"' for m in MODULES),
        sources=[_native_path(m + ".c", absolute) for m in MODULES],
        include_dirs=[NATIVE_DIR],
        define_macros=[("_GNU_SOURCE", None)],
        extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-pthread"],
        extra_link_args=["-pthread"],
        depends=[_native_path(f, absolute) for f in sorted(os.listdir(NATIVE_DIR))
                 if f.endswith(".h")],
    )
    return builder


def cdef_from_headers() -> str:
    """The cffi declarations, taken from the public headers themselves so
    that they cannot drift apart: comments, include guards and #includes
    are dropped; a #define whose value is not a plain integer becomes
    ``#define NAME ...`` (cffi asks the compiler for it)."""
    out = []
    for m in MODULES:
        with open(os.path.join(NATIVE_DIR, m + ".h"), encoding="utf-8") as f:
            text = re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)
        for line in text.splitlines():
            d = re.match(r"\s*#\s*define\s+(\w+)(?:\s+(.*))?$", line)
            if d:
                name, value = d.group(1), (d.group(2) or "").strip()
                if value:  # include guards have none
                    out.append(f"#define {name} {value if value.isdigit() else '...'}")
                continue
            if line.lstrip().startswith("#"):
                continue
            out.append(line)
    return "\n".join(out)


CDEF = cdef_from_headers()

ffibuilder = make_builder()


def build_in_place() -> str:
    """Compile replicator/_core*.so next to replicator/__init__.py."""
    tmpdir = os.path.join(ROOT_DIR, "build", "cffi-core")
    os.makedirs(tmpdir, exist_ok=True)
    so = make_builder(absolute=True).compile(tmpdir=tmpdir, verbose=False)
    pkg = os.path.join(ROOT_DIR, "replicator")
    dest = os.path.join(pkg, os.path.basename(so))
    # One module file only: a stale _core.abi3.so (pip) or
    # _core.cpython-*.so (here) must not shadow the fresh one.
    for f in os.listdir(pkg):
        if f.startswith("_core.") and f.endswith(".so") and os.path.join(pkg, f) != dest:
            os.unlink(os.path.join(pkg, f))
    os.replace(so, dest)
    return dest


if __name__ == "__main__":
    print(build_in_place(), file=sys.stderr)
