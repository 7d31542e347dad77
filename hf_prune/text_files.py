"""Text read lazily from `.txt` / `.jsonl` files (or a directory of them), in pieces of bounded size.

Calibration needs a few thousand tokens, so a file is never read whole: [`TextFiles`] yields pieces of at most
`chunk_chars` characters (a single 500 MB line included) and the consumer stops reading once it has what it needs.
Only the part that is read is checked (UTF-8, JSON); [`TextFiles.check`] reads up to the first text, before any work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

#: characters per piece handed to a tokenizer (and per read): bounds the tokenizer's working memory
CHUNK_CHARS = 1 << 20
#: a `.jsonl` record is parsed whole; a line longer than this (in characters) is refused instead of read
MAX_JSONL_LINE_CHARS = 64 << 20

SUFFIXES = (".txt", ".jsonl")


class TextFiles:
    """The texts of a `.txt` file (one text), a `.jsonl` file (the `text` field of each line) or a directory of
    them (sorted by name), read lazily.

    Iterating yields `(piece, starts_text)` pairs: each text comes as consecutive pieces of at most `chunk_chars`
    characters, the first with `starts_text=True`. Nothing is cached: each iteration reads the files again, and
    stopping early reads nothing more.

    Args:
        path: the file or directory.
        what: the option it came from (e.g. `"calibration"`), used in error messages as `--{what}`.
        chunk_chars: characters per piece.
    """

    def __init__(self, path: str | os.PathLike, what: str, chunk_chars: int = CHUNK_CHARS):
        self.path = Path(path)
        self.what = what.lstrip("-")
        self.chunk_chars = chunk_chars
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.suffix in SUFFIXES and p.is_file())
            if not self.files:
                raise ValueError(f"--{self.what} directory {str(self.path)!r} holds no .txt or .jsonl files")
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise FileNotFoundError(f"--{self.what}: no such file or directory: {str(self.path)!r}")

    def __repr__(self) -> str:
        return f"TextFiles({str(self.path)!r})"

    def check(self) -> None:
        """Checks, before any work, what can be checked cheaply: the first `chunk_chars` characters of every file
        are read (UTF-8, JSON lines), so small files are checked whole; and there is some non-blank text (read up to
        the first). A problem further into a big file is raised, naming it, when (if ever) it is read."""
        found = False
        for file in self.files:
            read = 0
            for piece, _ in self._pieces(file):
                found = found or not piece.isspace()
                read += len(piece)
                if read >= self.chunk_chars:
                    break
        if not found and not any(not piece.isspace() for piece, _ in self):
            raise ValueError(f"--{self.what} {str(self.path)!r} holds no text")

    def __iter__(self) -> Iterator[tuple[str, bool]]:
        for file in self.files:
            yield from self._pieces(file)

    def _pieces(self, file: Path) -> Iterator[tuple[str, bool]]:
        texts = self._jsonl(file) if file.suffix == ".jsonl" else self._txt(file)
        try:
            yield from texts
        except UnicodeDecodeError as err:
            raise ValueError(f"--{self.what} {str(file)!r} is not UTF-8 text ({err})") from None

    def _txt(self, file: Path) -> Iterator[tuple[str, bool]]:
        with open(file, encoding="utf-8") as fh:
            first = True
            while piece := fh.read(self.chunk_chars):
                yield piece, first
                first = False

    def _jsonl(self, file: Path) -> Iterator[tuple[str, bool]]:
        with open(file, encoding="utf-8") as fh:
            number = 0
            while line := fh.readline(MAX_JSONL_LINE_CHARS + 1):
                number += 1
                if len(line) > MAX_JSONL_LINE_CHARS and not line.endswith("\n"):
                    raise ValueError(
                        f"--{self.what} {str(file)!r} line {number} is longer than {MAX_JSONL_LINE_CHARS:,} characters; "
                        "a .jsonl record is parsed whole, so split it into several records or give the text as .txt"
                    )
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"--{self.what} {str(file)!r} line {number}: not valid JSON ({err.msg}, column {err.colno})"
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"--{self.what} {str(file)!r} line {number}: expected a JSON object with a 'text' string")
                yield from split_text(record["text"], self.chunk_chars)


def split_text(text: str, chunk_chars: int = CHUNK_CHARS) -> Iterator[tuple[str, bool]]:
    """One in-memory text as `(piece, starts_text)` pairs of at most `chunk_chars` characters."""
    for start in range(0, len(text), chunk_chars):
        yield text[start : start + chunk_chars], start == 0


def text_pieces(texts: Iterable[str] | TextFiles, chunk_chars: int = CHUNK_CHARS) -> Iterator[tuple[str, bool]]:
    """`(piece, starts_text)` pairs of a [`TextFiles`] or of in-memory strings."""
    if isinstance(texts, TextFiles):
        yield from texts
        return
    for text in texts:
        yield from split_text(text, chunk_chars)


def read_texts(path: str | os.PathLike, what: str) -> list[str]:
    """Every text of a `.txt` / `.jsonl` file or directory, whole, in memory (for training data, which is used whole).

    Prefer [`TextFiles`] where only part of the text is needed."""
    source = TextFiles(path, what)
    source.check()
    texts: list[list[str]] = []
    for piece, starts in source:
        if starts or not texts:
            texts.append([])
        texts[-1].append(piece)
    return ["".join(parts) for parts in texts]
