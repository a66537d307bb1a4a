"""Tests of the shared test fixtures themselves (tests/fixtures, tests/conftest.py)."""
