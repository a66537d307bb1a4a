"""The C core is built by cffi in API mode (out-of-line) as replicator._core."""
from setuptools import setup

setup(cffi_modules=["native/build_core.py:ffibuilder"])
