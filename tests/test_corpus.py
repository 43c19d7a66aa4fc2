"""The train/held-out split of the shipped corpus is deterministic, disjoint and complete."""

from __future__ import annotations

import gzip
from pathlib import Path

from dsc.corpus import DEFAULT_CORPUS, heldout_text, load_corpus, split_chapters, split_corpus


def test_default_corpus_is_shipped() -> None:
    assert DEFAULT_CORPUS.is_file()
    assert load_corpus().startswith("Genesis 1\nIn the beginning God created")


def test_split_is_deterministic_disjoint_and_complete() -> None:
    text = load_corpus()
    train, heldout = split_corpus(text)
    assert (train, heldout) == split_corpus(text)
    assert heldout == heldout_text()
    assert len(train) + len(heldout) == len(text)

    chapters = split_chapters(text)
    assert len(chapters) == 1189  # the KJV has 1,189 chapters
    train_headers = {c.splitlines()[0] for c in split_chapters(train)}
    heldout_headers = [c.splitlines()[0] for c in split_chapters(heldout)]
    assert heldout_headers and not train_headers & set(heldout_headers)
    assert len(train_headers) + len(heldout_headers) == len(chapters)
    assert 0.04 <= len(heldout_headers) / len(chapters) <= 0.06
    assert heldout_headers[0] == "Genesis 20"


def test_plain_and_gzip_text(tmp_path: Path) -> None:
    text = "Book 1\nverse one.\nverse two.\nBook 2\nverse three.\n"
    plain = tmp_path / "c.txt"
    plain.write_text(text, encoding="utf-8")
    packed = tmp_path / "c.txt.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write(text)
    assert load_corpus(plain) == load_corpus(packed) == text
    assert split_chapters(text) == ["Book 1\nverse one.\nverse two.\n", "Book 2\nverse three.\n"]
