"""Shared test helpers: the optional ``../shared`` reference material and tiny configs; and the check
that the test suite leaves nothing in the repository tree (a session that does fails, naming the files)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "minimind2"
FIXTURES3 = SHARED / "fixtures" / "minimind3"

# Every study a test runs (and its subprocesses, which inherit this) skips the cost forecast's probe: it
# would add seconds of CPU to each. tests/test_forecast.py turns it on where it is the subject.
os.environ.setdefault("MINIMIND_TUNE_FORECAST", "0")


def repository_files() -> set[str] | None:
    """``git status`` of the repository tree, one line per untracked or ignored file (each named) and per
    changed tracked file; None when the tests do not run from a git checkout. pytest's own cache and
    bytecode are left out, and so is a virtual environment inside the checkout (its files are not
    written by tests, and listing them takes seconds)."""
    try:
        top = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True, timeout=60).stdout.strip()
        if Path(top).resolve() != REPO:
            return None  # (an unpacked source tree inside some other repository)
        venv = Path(sys.prefix).resolve()
        exclude = [f":(exclude){venv.relative_to(REPO)}"] if venv.is_relative_to(REPO) else []
        out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all", "--ignored",
                              "--", ".", *exclude], capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line for line in out.splitlines()
            if not (line[3:].startswith(".pytest_cache/") or "__pycache__/" in line)}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = repository_files()


def pytest_sessionfinish(session: pytest.Session) -> None:
    # A test that writes into the checkout (a file: URI taken for a relative path left a folder named
    # "file:" that got committed) fails the session, whichever test it was.
    before = session.config.stash.get(_BEFORE, None)
    after = repository_files() if before is not None else None
    left = sorted(after - before) if after is not None and before is not None else []
    if left:
        title = f"the test session left {len(left)} file(s) in the repository tree {REPO}"
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            print(title, *left[:20], sep="\n", file=sys.stderr)
        else:
            reporter.write_sep("=", title, red=True)
            for line in left[:20]:
                reporter.write_line(line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[set[str] | None]()


def need_shared(path: Path) -> Path:
    """Return ``path`` or skip: ``../shared`` exists beside the development checkout only."""
    if not path.exists():
        pytest.skip(f"reference material not present: {path}")
    return path


@pytest.fixture(scope="session", autouse=True)
def shared_token_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One token cache for every study driver of the session (study_driver.SHARED_TOKENS)."""
    from study_driver import SHARED_TOKENS

    os.environ[SHARED_TOKENS] = str(tmp_path_factory.mktemp("tokens"))


@pytest.fixture
def fixture_dir() -> Path:
    return need_shared(FIXTURES)


def make_checkpoint(folder: Path, epoch: int, val: float, *, meta: bool = True, state: bytes | None = None) -> Path:
    """A trial checkpoint folder as tune.searcher.train_trial writes it (``meta=False``: cut short before meta.json;
    ``state``: the resume state's bytes instead of a small torch file)."""
    folder.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, folder / "model.pth")
    if state is None:
        torch.save({"epoch": epoch}, folder / "train_state.pt")
    else:
        (folder / "train_state.pt").write_bytes(state)
    if meta:
        (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": {"val_loss": val}}))
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# Every way a checkpoint file can be incomplete or unreadable, as (file, damage, words of the problem).
DAMAGES: dict[str, tuple[str, Any, str]] = {
    "state-missing": ("train_state.pt", Path.unlink, "train_state.pt is missing"),
    "state-empty": ("train_state.pt", lambda p: p.write_bytes(b""), "train_state.pt is empty"),
    "state-truncated": ("train_state.pt", _truncate, "train_state.pt is truncated"),
    "state-not-torch": ("train_state.pt", lambda p: p.write_text("not torch"), "train_state.pt is truncated or not"),
    "model-missing": ("model.pth", Path.unlink, "model.pth is missing"),
    "model-empty": ("model.pth", lambda p: p.write_bytes(b""), "model.pth is empty"),
    "model-truncated": ("model.pth", _truncate, "model.pth is truncated"),
    "model-not-torch": ("model.pth", lambda p: p.write_text("{}"), "model.pth is truncated or not"),
    "meta-missing": ("meta.json", Path.unlink, "meta.json is missing"),
    "meta-not-json": ("meta.json", lambda p: p.write_text("{"), "meta.json is unreadable"),
}


def damage(folder: Path, form: str) -> str:
    """Damage the checkpoint ``folder`` as :data:`DAMAGES` ``form`` says; the problem's words."""
    name, how, words = DAMAGES[form]
    how(folder / name)
    return words


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


def mount_tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` (``mount``'s form: ``1m``) at ``path``, a disk that fills; False where not
    allowed (not root). The caller unmounts it (``umount -l``)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=30)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


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
