"""Shared test helpers: the optional ``../shared`` reference material and tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "minimind2"


def need_shared(path: Path) -> Path:
    """Return ``path`` or skip: ``../shared`` exists beside the development checkout only."""
    if not path.exists():
        pytest.skip(f"reference material not present: {path}")
    return path


@pytest.fixture
def fixture_dir() -> Path:
    return need_shared(FIXTURES)
