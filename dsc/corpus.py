"""The training/held-out text corpus shipped with dsc.

The repo ships the public-domain King James Bible at ``examples/data/kjv.txt.gz``: one verse
per line, each chapter introduced by a header line such as ``Genesis 1`` or ``1 Samuel 3``.
The tiny example models under ``examples/models/`` are trained on the train split made here,
and anything that measures accuracy (perplexity, calibration-vs-evaluation data) should use
the held-out split, so that the numbers are on text the models never saw.

The split is chapter-level and deterministic: chapters are numbered in file order from 0 and
every ``HOLDOUT_EVERY``-th one (index % 20 == 19) is held out, about 5% of the chapters,
spread evenly over both testaments. No randomness, no dependence on anything but the text.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

__all__ = [
    "DEFAULT_CORPUS",
    "HOLDOUT_EVERY",
    "heldout_text",
    "load_corpus",
    "split_chapters",
    "split_corpus",
    "train_text",
]

DEFAULT_CORPUS: Path = Path(__file__).resolve().parents[1] / "examples" / "data" / "kjv.txt.gz"
"""The King James Bible as shipped in the repository (gzip, one verse per line)."""

HOLDOUT_EVERY: int = 20
"""One chapter in this many is held out (the last of each run of 20)."""

# A chapter header: an optional leading book number ("1 Samuel"), words, then the chapter
# number alone, e.g. "Genesis 1", "Song of Solomon 8", "2 Kings 25". Verses never match:
# they contain punctuation or do not end in a bare number.
_HEADER = re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z]*(?: [A-Za-z]+)* \d+$")


def load_corpus(path: str | Path | None = None) -> str:
    """Return the corpus text, with ``\\n`` line endings and a trailing newline.

    ``path`` defaults to the shipped ``examples/data/kjv.txt.gz``; a ``.gz`` file is
    decompressed, anything else is read as UTF-8 text.
    """
    p = Path(path) if path is not None else DEFAULT_CORPUS
    if not p.is_file():
        raise FileNotFoundError(f"corpus not found: {p}")
    if p.suffix == ".gz":
        with gzip.open(p, "rt", encoding="utf-8") as f:
            text = f.read()
    else:
        text = p.read_text(encoding="utf-8")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def split_chapters(text: str) -> list[str]:
    """Split ``text`` into chapters, each starting with its header line and ending in ``\\n``.

    Lines before the first header (if any) form a chapter of their own. Blank lines are kept
    with the chapter they are in.
    """
    chapters: list[list[str]] = []
    for line in text.splitlines():
        if _HEADER.match(line) or not chapters:
            chapters.append([])
        chapters[-1].append(line)
    return ["\n".join(lines) + "\n" for lines in chapters]


def split_corpus(text: str) -> tuple[str, str]:
    """Split ``text`` into ``(train, heldout)`` by chapter.

    Chapter ``i`` (0-based, in file order) goes to held-out when
    ``i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1``, otherwise to train. Both parts keep file
    order, so ``train`` and ``heldout`` are each a concatenation of whole chapters and
    together contain every line of ``text`` exactly once.
    """
    train: list[str] = []
    heldout: list[str] = []
    for i, chapter in enumerate(split_chapters(text)):
        (heldout if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 else train).append(chapter)
    return "".join(train), "".join(heldout)


def train_text(path: str | Path | None = None) -> str:
    """The train split of the corpus at ``path`` (default: the shipped KJV)."""
    return split_corpus(load_corpus(path))[0]


def heldout_text(path: str | Path | None = None) -> str:
    """The held-out split of the corpus at ``path`` (default: the shipped KJV)."""
    return split_corpus(load_corpus(path))[1]
