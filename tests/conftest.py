"""Shared test helpers: the optional ``../shared`` reference material and tiny configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def make_checkpoint(folder: Path, epoch: int, val: float, *, meta: bool = True, state: bytes = b"x") -> Path:
    """A trial checkpoint folder as tune.trainable writes it (``meta=False``: cut short before meta.json)."""
    folder.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, folder / "model.pth")
    (folder / "train_state.pt").write_bytes(state)
    if meta:
        (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": {"val_loss": val}}))
    return folder
