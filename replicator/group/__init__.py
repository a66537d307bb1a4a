"""Consistency groups across primary hosts (DESIGN §13)."""
