"""Tests: run with `pytest tests` from the repository root."""
