"""Tasks for train-short/test-long studies: synthetic sequence tasks and character-level
corpora (Shakespeare, the Python standard library, any text file or folder)."""

from posenc.data.synthetic import SYNTHETIC_TASKS, Example, SyntheticTask
from posenc.data.text import CORPORA, CharCorpus, load_text

__all__ = ["CORPORA", "SYNTHETIC_TASKS", "CharCorpus", "Example", "SyntheticTask", "load_text"]
