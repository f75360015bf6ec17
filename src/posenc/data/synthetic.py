"""Synthetic sequence tasks that need positions, framed for a causal decoder.

Every example is one token sequence ``[BOS] input [SEP] answer``; the model is trained
with next-token prediction on the answer tokens only, and scored on them.

Vocabulary (shared by every task, so one model size fits all):

    0 PAD   1 BOS   2 SEP   3 .. 3+S-1 symbols   3+S .. 3+S+9 digits 0..9

``n`` is the *length* of an example: the number of input items (symbols, or key/value
pairs for ``recall``). Training draws ``n`` uniformly from ``1..L`` for every example
of a batch (``sample_mixed``: right-padded, causal, so padding cannot change an
example); evaluation runs at fixed ``n`` (``sample``).

Tasks (Deletang et al. 2023 and Ruoss et al. 2023 for copy/reverse/duplicate/sort;
Zoology / Arora et al. 2023 for associative recall):

    copy       x1..xn            -> x1..xn
    reverse    x1..xn            -> xn..x1
    duplicate  x1..xn            -> x1..xn x1..xn
    sort       x1..xn            -> sorted(x)
    recall     k1 v1 .. kn vn q  -> the value of the last pair whose key is q
    count      x1..xn q          -> the number of q in x, in decimal, zero-padded to
                                    the digits of n (a counting task)

Shapes: ``tokens [b, s]`` int64 and ``answer_mask [b, s]`` bool (True at answer tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from posenc.functional.checks import positive_int

PAD, BOS, SEP = 0, 1, 2
NUM_SPECIAL = 3
NUM_DIGITS = 10


@dataclasses.dataclass(frozen=True)
class Example:
    """A batch of examples of one length: ``tokens [b, s]``, ``answer_mask [b, s]``."""

    tokens: torch.Tensor
    answer_mask: torch.Tensor


def _symbols(n: int, batch: int, num_symbols: int, gen: torch.Generator, low: int = 0) -> torch.Tensor:
    """Random symbol tokens ``[batch, n]`` drawn from symbols ``low..num_symbols-1``."""
    return torch.randint(low, num_symbols, (batch, n), generator=gen) + NUM_SPECIAL  # [b, n]


def _frame(inputs: torch.Tensor, answer: torch.Tensor) -> Example:
    """``[BOS] inputs [SEP] answer`` with the mask on the answer."""
    b = inputs.shape[0]
    bos = torch.full((b, 1), BOS, dtype=torch.long)
    sep = torch.full((b, 1), SEP, dtype=torch.long)
    tokens = torch.cat([bos, inputs, sep, answer], dim=1)  # [b, 1 + n_in + 1 + n_ans]
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, tokens.shape[1] - answer.shape[1] :] = True
    return Example(tokens, mask)


def _copy(n, batch, s, gen):
    x = _symbols(n, batch, s, gen)
    return _frame(x, x)


def _reverse(n, batch, s, gen):
    x = _symbols(n, batch, s, gen)
    return _frame(x, x.flip(1))


def _duplicate(n, batch, s, gen):
    x = _symbols(n, batch, s, gen)
    return _frame(x, torch.cat([x, x], dim=1))


def _sort(n, batch, s, gen):
    x = _symbols(n, batch, s, gen)
    return _frame(x, x.sort(dim=1).values)


def _recall(n, batch, s, gen):
    # Keys from the first half of the symbols, values from the second half.
    half = s // 2
    keys = _symbols(n, batch, half, gen)  # [b, n]
    values = _symbols(n, batch, s, gen, low=half)  # [b, n]
    pairs = torch.stack([keys, values], dim=2).reshape(batch, 2 * n)  # [b, 2n] = k1 v1 k2 v2 ...
    pick = torch.randint(0, n, (batch, 1), generator=gen)  # a key that occurs
    query = keys.gather(1, pick)  # [b, 1]
    # The value of the *last* pair with that key.
    idx = torch.arange(n).expand(batch, n)
    last = torch.where(keys == query, idx, torch.full_like(idx, -1)).max(dim=1, keepdim=True).values  # [b, 1]
    answer = values.gather(1, last)  # [b, 1]
    return _frame(torch.cat([pairs, query], dim=1), answer)


def count_digits(n: int) -> int:
    """Digits of the answer of ``count`` at length ``n``: ``len(str(n))``."""
    return len(str(n))


def _count(n, batch, s, gen):
    x = _symbols(n, batch, s, gen)
    pick = torch.randint(0, n, (batch, 1), generator=gen)
    query = x.gather(1, pick)  # [b, 1]: a symbol that occurs, so counts are 1..n
    counts = (x == query).sum(dim=1)  # [b]
    width = count_digits(n)
    powers = 10 ** torch.arange(width - 1, -1, -1)  # [width], most significant first
    digits = (counts[:, None] // powers) % 10  # [b, width]
    answer = digits + NUM_SPECIAL + s
    return _frame(torch.cat([x, query], dim=1), answer)


_TASKS: dict[str, Callable[[int, int, int, torch.Generator], Example]] = {
    "copy": _copy,
    "reverse": _reverse,
    "duplicate": _duplicate,
    "sort": _sort,
    "recall": _recall,
    "count": _count,
}

SYNTHETIC_TASKS: tuple[str, ...] = tuple(_TASKS)


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """One synthetic task with ``num_symbols`` symbols.

    Example:
        >>> task = SyntheticTask("copy", num_symbols=8)
        >>> ex = task.sample(5, batch=2, generator=torch.Generator().manual_seed(0))
        >>> ex.tokens.shape                      # [2, 1 + 5 + 1 + 5]
    """

    name: str
    num_symbols: int = 16

    def __post_init__(self) -> None:
        if self.name not in _TASKS:
            raise ValueError(f"unknown synthetic task {self.name!r}; available: {sorted(_TASKS)}")
        if positive_int("num_symbols", self.num_symbols) < 2:
            raise ValueError(f"num_symbols must be >= 2, got {self.num_symbols}")

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + self.num_symbols + NUM_DIGITS

    def sequence_length(self, n: int) -> int:
        """Tokens in one example of length ``n`` (BOS, input, SEP, answer)."""
        positive_int("n", n)
        answer = {"copy": n, "reverse": n, "duplicate": 2 * n, "sort": n, "recall": 1, "count": count_digits(n)}
        inputs = {"recall": 2 * n + 1, "count": n + 1}.get(self.name, n)
        return 2 + inputs + answer[self.name]

    def sample(self, n: int, batch: int, generator: torch.Generator) -> Example:
        """``batch`` random examples of length ``n`` (``tokens [batch, s]``)."""
        positive_int("n", n)
        positive_int("batch", batch)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return _TASKS[self.name](n, batch, self.num_symbols, generator)

    def sample_mixed(self, lengths: torch.Tensor, generator: torch.Generator) -> tuple[Example, torch.Tensor]:
        """One example per entry of ``lengths [b]``, right-padded with PAD.

        Returns the examples (``tokens [b, s_max]``, ``answer_mask`` False on padding)
        and ``positions [b, s_max]``: ``0..s_i-1`` on each example's tokens and 0 on its
        padding, so that length-dependent encodings (``normalized``) see each example's
        own length. With a causal mask, padding after an example cannot change it.
        """
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.dtype.is_floating_point:
            raise TypeError("lengths must be an integer tensor [b]")
        if not len(lengths) or int(lengths.min()) <= 0:
            raise ValueError(f"lengths must be non-empty and > 0, got {lengths.tolist()}")
        b = len(lengths)
        s_max = max(self.sequence_length(int(n)) for n in lengths.unique())
        tokens = torch.full((b, s_max), PAD, dtype=torch.long)
        mask = torch.zeros((b, s_max), dtype=torch.bool)
        positions = torch.zeros((b, s_max), dtype=torch.long)
        for n in lengths.unique().tolist():  # sorted, so the draw order is deterministic
            rows = (lengths == n).nonzero().squeeze(1)  # [k]
            ex = self.sample(n, len(rows), generator)
            s = ex.tokens.shape[1]
            tokens[rows, :s] = ex.tokens
            mask[rows, :s] = ex.answer_mask
            positions[rows, :s] = torch.arange(s)
        return Example(tokens, mask), positions
