"""Tokenizers: loading a MiniMind2-format folder (the bundled one by default) and its fingerprint.

A MiniMind2-format folder holds ``tokenizer.json`` (byte-level BPE) and ``tokenizer_config.json``
(special tokens and the ChatML chat template). Ids 0, 1 and 2 are ``<|endoftext|>`` (pad and unk),
``<|im_start|>`` and ``<|im_end|>``; the training code relies on those ids, so loading checks them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = ["BUNDLED_TOKENIZER3_DIR", "BUNDLED_TOKENIZER_DIR", "SPECIAL_TOKENS", "TOKENIZER_FILES",
           "load_tokenizer", "tokenizer_fingerprint"]

BUNDLED_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"
# MiniMind-3's tokenizer (upstream d65ef2c, Apache-2.0), byte copies; see its SOURCE.md.
BUNDLED_TOKENIZER3_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# In id order: pad/unk, bos, eos.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Load a MiniMind2-format tokenizer folder (None: the bundled one) and check its contract. Raises
    FileNotFoundError when the folder or a file is missing, ValueError when the files do not load or the
    special-token ids or the chat template are not MiniMind2's."""
    directory = BUNDLED_TOKENIZER_DIR if path is None else Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(directory)!r} does not exist or is not a folder")
    missing = [name for name in TOKENIZER_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"tokenizer folder {str(directory)!r} lacks {', '.join(missing)} "
            f"(a MiniMind2-format tokenizer has {' and '.join(TOKENIZER_FILES)})")
    try:
        # local_files_only: a bad local path must fail here, never turn into a Hub download.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # tokenizers/transformers raise many types for corrupt files
        raise ValueError(f"tokenizer folder {str(directory)!r} does not load: {exc}") from exc
    problems = []
    for expected_id, (role, token) in enumerate(zip(("pad_token", "bos_token", "eos_token"), SPECIAL_TOKENS)):
        if (actual := tokenizer.convert_tokens_to_ids(token)) != expected_id:
            problems.append(f"{token} has id {actual}, expected {expected_id}")
        if getattr(tokenizer, role) != token:
            problems.append(f"{role} is {getattr(tokenizer, role)!r}, expected {token!r}")
    if not tokenizer.chat_template:
        problems.append("tokenizer_config.json has no chat_template")
    if problems:
        raise ValueError(f"tokenizer folder {str(directory)!r} is not MiniMind2-format: " + "; ".join(problems))
    return tokenizer


def tokenizer_fingerprint(tokenizer_or_dir: PreTrainedTokenizerBase | str | Path) -> str:
    """sha256 (hex) over tokenizer.json and tokenizer_config.json in canonical JSON form (sorted keys, no
    whitespace: line endings and indentation do not matter, content does); a tokenizer object is
    fingerprinted by the folder it was loaded from."""
    if isinstance(tokenizer_or_dir, PreTrainedTokenizerBase):
        source = tokenizer_or_dir.name_or_path
        if not source:
            raise ValueError("the tokenizer was not loaded from a folder; pass its folder instead")
        directory = Path(source)
    else:
        directory = Path(tokenizer_or_dir).expanduser()
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        file = directory / name
        if not file.is_file():
            raise FileNotFoundError(f"cannot fingerprint tokenizer: {str(file)!r} does not exist")
        try:
            content = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot fingerprint tokenizer: {str(file)!r} is not JSON: {exc}") from exc
        digest.update(name.encode() + b"\0")
        digest.update(json.dumps(content, sort_keys=True, ensure_ascii=False,
                                 separators=(",", ":")).encode("utf-8") + b"\0")
    return digest.hexdigest()
