"""Shared test helpers: the optional ``../shared`` reference material and tiny configs."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "minimind2"
FIXTURES3 = SHARED / "fixtures" / "minimind3"


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


def killed_mid_write(code: str, limit: int = 16) -> None:
    """Run ``code`` in a Python subprocess and SIGKILL it in the middle of a write, as a driver killed at
    that moment: ``code`` calls ``cut()`` just before the write, after which a file takes only ``limit``
    bytes (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write fails with EFBIG, and the process then
    kills itself, whatever the code made of the error). Asserts that a write was cut."""
    import signal
    import subprocess
    import sys
    import textwrap

    harness = textwrap.dedent(f"""
        import errno, os, resource, signal
        def cut():
            resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            exec(compile({textwrap.dedent(code)!r}, "<killed_mid_write>", "exec"))
        except BaseException as exc:  # (the failed write, or what the code made of it)
            cause = exc
            while cause is not None:
                if isinstance(cause, OSError) and cause.errno == errno.EFBIG:
                    os.kill(os.getpid(), signal.SIGKILL)
                cause = cause.__cause__ or cause.__context__
            raise
    """)
    done = subprocess.run([sys.executable, "-c", harness], check=False, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, f"no write was cut (rc {done.returncode}): {done.stderr[-2000:]}"


@pytest.fixture(scope="session")
def tok() -> Any:
    """The bundled MiniMind2 tokenizer."""
    from minimind_train.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def tok3() -> Any:
    """Upstream MiniMind-3's tokenizer (``../shared``)."""
    from minimind_train.tokenizer import load_tokenizer

    return load_tokenizer(need_shared(FIXTURES3))


@pytest.fixture(scope="session")
def rows3() -> list[dict[str, Any]]:
    """Upstream MiniMind-3's reference conversations: reasoning, tool use, empty think blocks (``../shared``)."""
    lines = need_shared(FIXTURES3 / "conversations.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def msg(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


def qa(question: str, answer: str) -> dict[str, Any]:
    """A one-round MiniMind SFT row."""
    return {"conversations": [msg("user", question), msg("assistant", answer)]}


def write_rows(path: Path, rows: Iterable[Any]) -> Path:
    """A jsonl file of ``rows``, one JSON value per line; a str row is written verbatim (blank or
    malformed lines)."""
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` MiniMind SFT rows of random words: one or two rounds each, every fifth with a system prompt."""
    rng = random.Random(seed)
    words = ["sun", "rain", "river", "stone", "light", "green", "cloud", "north", "quiet", "swift"]
    rows = []
    for i in range(n):
        convs = [{"role": "system", "content": "Be terse."}] if i % 5 == 0 else []
        for _ in range(rng.randint(1, 2)):
            convs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 9)))})
            convs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 39)))})
        rows.append({"conversations": convs})
    return rows
