"""Fixtures shared with the host tests (tiny random VLMs of all four families)."""
from tests.hosts.conftest import vlm  # noqa: F401 (a fixture, re-exported for tests/pruners)
