"""Helpers shared by several test modules (imported as ``tests.support.*``)."""
