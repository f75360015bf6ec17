"""Synthetic sequence tasks that need positions, framed for a causal decoder.

Every example is one token sequence ``[BOS] input [SEP] answer``; the model is trained
with next-token prediction on the answer tokens only (``answer_mask``), and scored on them.

Vocabulary (shared by every task, so one model size fits all):

    0 PAD   1 BOS   2 SEP   3 .. 3+S-1 symbols   3+S .. 3+S+9 digits 0..9

``n`` is the *length* of an example: the number of input items (symbols, or key/value
pairs for ``recall``). Training draws ``n`` uniformly from ``1..L`` for every example
of a batch (``sample_mixed``: right-padded, causal, so padding cannot change an
example); evaluation runs at fixed ``n`` (``sample``).

Tasks (Deletang et al. 2023 and Ruoss et al. 2023 for copy/reverse/duplicate/sort;
multi-query associative recall, MQAR, from Zoology / Arora et al. 2023):

    task       input                     answer (the masked tokens)
    copy       x1..xn                    x1..xn
    reverse    x1..xn                    xn..x1
    duplicate  x1..xn                    x1..xn x1..xn
    sort       x1..xn                    sorted(x)
    recall     k1 v1 .. kn vn            q1 a1 .. qn an: the queries q (a random order of
                                         the n distinct keys) are read, only the answers
                                         a_i = the value of key q_i are masked
    count      x1..xn q                  c = x.count(q), 1 <= c <= min(n, max_count), in
                                         decimal zero-padded to the digits of max_count

Every answer token at every test length also occurs as an answer at the training
lengths ``1..L``: symbols and values are drawn from the same set at every ``n``; the
count of ``count`` is at most ``max_count`` (so its answers are the same fixed-width
strings at every ``n`` once ``max_count <= L``), and ``recall`` answers one value per
key. ``recall`` needs ``n`` distinct keys: ``num_symbols >= 2 n`` at the longest ``n``.

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


def recall_keys(num_symbols: int) -> int:
    """Key symbols of ``recall``: the first half, ``num_symbols // 2`` (the values are the
    rest), so an example of ``n`` pairs needs ``num_symbols >= 2 n``."""
    return num_symbols // 2


def _recall(n, batch, s, gen):
    """MQAR (Arora et al. 2023, Zoology): ``[BOS] k1 v1 .. kn vn [SEP] q1 a1 .. qn an``.

    Keys are distinct within an example (drawn without replacement from the key half of
    the symbols), values are drawn with replacement from the value half, the queries are
    a random permutation of the keys and ``a_i`` is the value paired with ``q_i``. Only
    the ``a_i`` are in the mask: the model reads ``q_i`` and predicts ``a_i``.
    """
    half = recall_keys(s)
    # A uniform random permutation of the keys per row; its first n entries are a
    # uniform sample without replacement in random order.
    keys = torch.rand(batch, half, generator=gen).argsort(dim=1)[:, :n] + NUM_SPECIAL  # [b, n]
    values = _symbols(n, batch, s, gen, low=half)  # [b, n]
    pairs = torch.stack([keys, values], dim=2).reshape(batch, 2 * n)  # [b, 2n] = k1 v1 k2 v2 ...
    order = torch.rand(batch, n, generator=gen).argsort(dim=1)  # [b, n]: the query order
    queries = keys.gather(1, order)  # [b, n]
    answers = values.gather(1, order)  # [b, n]: the value of each query's key (keys are distinct)
    tail = torch.stack([queries, answers], dim=2).reshape(batch, 2 * n)  # [b, 2n] = q1 a1 q2 a2 ...
    ex = _frame(pairs, tail)
    mask = ex.answer_mask.clone()
    mask[:, -2 * n :: 2] = False  # the queries are inputs; the mask keeps a1..an
    return Example(ex.tokens, mask)


def count_digits(max_count: int) -> int:
    """Digits of every answer of ``count``: ``len(str(max_count))`` (fixed at every ``n``)."""
    return len(str(max_count))


def _count(n, batch, s, gen, max_count):
    """``[BOS] x1..xn q [SEP] digits of c``: exactly ``c`` of the ``x`` are ``q``.

    ``q`` is uniform over the symbols, ``c`` uniform over ``1..min(n, max_count)``, the
    ``c`` copies of ``q`` at uniformly random places, the other ``n - c`` items uniform
    over the symbols other than ``q``; ``c`` is written zero-padded to
    ``count_digits(max_count)`` digits.
    """
    query = torch.randint(0, s, (batch, 1), generator=gen)  # [b, 1]
    counts = torch.randint(0, min(n, max_count), (batch, 1), generator=gen) + 1  # [b, 1]
    rank = torch.rand(batch, n, generator=gen).argsort(dim=1)  # [b, n]: a random permutation
    is_query = rank < counts  # [b, n]: a uniform random set of c places
    other = torch.randint(0, s - 1, (batch, n), generator=gen)  # [b, n]: uniform over s - 1 symbols
    other = other + (other >= query).long()  # skips q: uniform over the symbols != q
    x = torch.where(is_query, query, other) + NUM_SPECIAL  # [b, n]
    width = count_digits(max_count)
    powers = 10 ** torch.arange(width - 1, -1, -1)  # [width], most significant first
    digits = (counts // powers) % 10  # [b, width]
    answer = digits + NUM_SPECIAL + s
    return _frame(torch.cat([x, query + NUM_SPECIAL], dim=1), answer)


_TASKS: dict[str, Callable[..., Example]] = {
    "copy": _copy,
    "reverse": _reverse,
    "duplicate": _duplicate,
    "sort": _sort,
    "recall": _recall,
    "count": _count,
}

SYNTHETIC_TASKS: tuple[str, ...] = tuple(_TASKS)

#: ``count``'s default ``max_count``: the study trains at ``L = 8``, so every count
#: ``1..8`` is an answer in training, and with ``max_count <= L`` every answer at every
#: test length (``n`` up to ``8 L``) is a string the model has produced in training.
DEFAULT_MAX_COUNT = 8


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """One synthetic task with ``num_symbols`` symbols.

    ``max_count`` (``count`` only; the other tasks ignore it): the largest count of the
    query symbol, and the number whose digits fix the answer's width. Default 8
    (``DEFAULT_MAX_COUNT``): the study trains at ``L = 8``; keep ``max_count <= L`` so that
    every test answer occurs in training. ``recall`` needs ``num_symbols >= 2 n`` at the
    longest ``n`` it is sampled at (``n`` distinct keys).

    Example:
        >>> task = SyntheticTask("copy", num_symbols=8)
        >>> ex = task.sample(5, batch=2, generator=torch.Generator().manual_seed(0))
        >>> ex.tokens.shape                      # [2, 1 + 5 + 1 + 5]
    """

    name: str
    num_symbols: int = 16
    max_count: int = DEFAULT_MAX_COUNT

    def __post_init__(self) -> None:
        if self.name not in _TASKS:
            raise ValueError(f"unknown synthetic task {self.name!r}; available: {sorted(_TASKS)}")
        if positive_int("num_symbols", self.num_symbols) < 2:
            raise ValueError(f"num_symbols must be >= 2, got {self.num_symbols}")
        if isinstance(self.max_count, bool) or not isinstance(self.max_count, int):
            raise TypeError(f"max_count must be an int, got {self.max_count!r}")
        if self.max_count < 1:
            raise ValueError(
                f"max_count must be >= 1 (the largest count of the query symbol; use the training "
                f"length L), got {self.max_count}"
            )

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + self.num_symbols + NUM_DIGITS

    def check_length(self, n: int) -> int:
        """``n`` as an int if the task can sample examples of length ``n``, else a
        ``TypeError``/``ValueError`` naming the fix (``recall``: ``n`` distinct keys)."""
        positive_int("n", n)
        if self.name == "recall" and n > recall_keys(self.num_symbols):
            raise ValueError(
                f"recall with n={n} key/value pairs needs {n} distinct keys, but num_symbols="
                f"{self.num_symbols} has {recall_keys(self.num_symbols)} (the first half); use "
                f"num_symbols >= {2 * n}"
            )
        return int(n)

    def sequence_length(self, n: int) -> int:
        """Tokens in one example of length ``n`` (BOS, input, SEP, answer); raises like
        ``sample`` for an ``n`` the task cannot sample."""
        self.check_length(n)
        answer = {
            "copy": n,
            "reverse": n,
            "duplicate": 2 * n,
            "sort": n,
            "recall": 2 * n,  # q1 a1 .. qn an
            "count": count_digits(self.max_count),
        }
        inputs = {"recall": 2 * n, "count": n + 1}.get(self.name, n)
        return 2 + inputs + answer[self.name]

    def sample(self, n: int, batch: int, generator: torch.Generator) -> Example:
        """``batch`` random examples of length ``n`` (``tokens [batch, s]``)."""
        self.check_length(n)
        positive_int("batch", batch)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if self.name == "count":
            return _count(n, batch, self.num_symbols, generator, self.max_count)
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
