"""Turning what users hand us as calibration data into fixed-length token windows."""

from __future__ import annotations

import logging
import numbers
import re
from collections.abc import Sequence

import torch

from ..text_files import CHUNK_CHARS, TextFiles, text_pieces

logger = logging.getLogger(__name__)


#: the windows are drawn from the first `max(POOL_FACTOR * num_samples * seq_len, MIN_POOL_TOKENS)` tokens of the
#: text (all of it when shorter), so memory and time stay bounded whatever the size of the calibration text.
#: MIN_POOL_TOKENS (2 Mi tokens, ~8 MB of English text, 16 MB of ids) keeps an ordinary calibration set whole: its
#: windows come from all of it, as before the bound (SmolLM2's 80 calibration articles are ~0.7 M tokens; drawn from
#: only their first 8 x 16 x 256 tokens, ADMM-50 % lost 13 % of held-out perplexity: 35.9 -> 40.7).
POOL_FACTOR = 8
MIN_POOL_TOKENS = 1 << 21
#: characters per tokenizer call: a fast tokenizer holds a few hundred bytes per token while encoding (offsets,
#: word ids, ...), so this bounds its peak memory to tens of MB
TOKENIZE_CHARS = 1 << 18
#: smallest piece handed to the tokenizer when only a few tokens are needed
MIN_CHUNK_CHARS = 1 << 16


def tokenize_texts(texts, tokenizer, separator: str = "\n\n", max_tokens: int | None = None) -> torch.Tensor:
    """Concatenated token ids of `texts` (one 1-D tensor), joined by `separator`, without special tokens.

    `texts` is a sequence of strings or a [`~hf_prune.text_files.TextFiles`]. The text is tokenised in pieces of
    at most `TOKENIZE_CHARS` (256 Ki) characters (cut before a whitespace run where there is one), so the tokenizer's
    working memory stays bounded; text up to that size is tokenised in one call, exactly as a whole. With
    `max_tokens`, reading stops as soon as that many tokens are collected and the result is cut to `max_tokens`;
    pieces are then `16 * max_tokens` characters (at least 64 Ki), so a small need reads and tokenises little.
    """
    if tokenizer is None:
        raise ValueError("calibration is given as text, so `tokenizer=` is required")
    if isinstance(texts, str):
        texts = [texts]
    chunks: list[torch.Tensor] = []
    count = 0
    chunk_chars = TOKENIZE_CHARS if max_tokens is None else min(TOKENIZE_CHARS, max(MIN_CHUNK_CHARS, 16 * max_tokens))
    for piece in _tokenizer_inputs(texts, separator, chunk_chars):
        ids = tokenizer(piece, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        chunks.append(torch.tensor(ids, dtype=torch.long))
        count += len(ids)
        if max_tokens is not None and count >= max_tokens:
            break
    if not chunks:
        raise ValueError("calibration text is empty")
    ids = torch.cat(chunks)
    return ids if max_tokens is None else ids[:max_tokens]


def _tokenizer_inputs(texts, separator: str, chunk_chars: int):
    """Strings of at most `chunk_chars` characters whose concatenation is `separator.join(non-blank texts)` (but for
    whitespace-only pieces)."""

    if not isinstance(texts, TextFiles):
        texts = (t for t in texts if t and not t.isspace())
    buffer, started = "", False
    for piece, starts_text in text_pieces(texts, CHUNK_CHARS):
        if starts_text and started:
            buffer += separator
        buffer += piece
        started = True
        while len(buffer) >= chunk_chars:
            cut = _cut_point(buffer, chunk_chars)
            head, buffer = buffer[:cut], buffer[cut:]
            if head and not head.isspace():
                yield head
    if buffer and not buffer.isspace():
        yield buffer


_WORD_END_REVERSED = re.compile(r"\s\S")


def _cut_point(text: str, limit: int) -> int:
    """Where to cut `text` (at most `limit` characters kept): the start of the last whitespace run, so that no word
    is split; `limit` itself when the second half holds no whitespace."""
    half = limit // 2
    window = text[half : limit + 1]
    match = _WORD_END_REVERSED.search(window[::-1])
    if match is None:
        return limit
    return half + len(window) - 1 - match.start()


def calibration_windows(
    calibration,
    tokenizer,
    *,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    owner: str = "config",
    vocab_size: int | None = None,
) -> torch.Tensor:
    """A `(num_samples, seq_len)` tensor of token ids (fewer rows, with a warning, if the data runs out).

    `calibration` may be a list of strings, a [`~hf_prune.text_files.TextFiles`] (files read lazily), a
    `datasets.Dataset` with a `text` or `input_ids` column, a 2-D tensor of token ids, or a list of token-id lists.
    Text is concatenated and cut into non-overlapping windows chosen at random (seeded) among the first
    `max(POOL_FACTOR * num_samples * seq_len, MIN_POOL_TOKENS)` tokens (8x what the windows need, at least 2 Mi):
    only that much text is read and tokenised, whatever its size, so a text shorter than that gives the same windows
    as tokenising it whole. Pre-tokenised rows
    are used as given (cut to `seq_len`). With `vocab_size`, every id must be in
    `[0, vocab_size)` (the model's embedding rows): an error names the offending id and where it is.
    """
    windows = _windows(calibration, tokenizer, num_samples, seq_len, seed, owner)
    if vocab_size is not None:
        check_token_ids(windows, vocab_size)
    return windows


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Raises naming the first token id outside `[0, vocab_size)`, its window and position."""
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        row, col = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"calibration: token id {int(ids[row, col])} (window {row}, position {col}) is outside the model's "
            f"vocabulary: ids must be in [0, {vocab_size}) (vocab_size {vocab_size}, the input embedding's rows); "
            f"{int(bad.sum())} id(s) are out of range. Was the calibration tokenised with another tokenizer?"
        )


def _windows(calibration, tokenizer, num_samples: int, seq_len: int, seed: int, owner: str) -> torch.Tensor:
    if calibration is None:
        raise ValueError("this method needs calibration data: pass `calibration=` (texts, a Dataset or token ids)")
    if _is_dataset(calibration):
        columns = list(calibration.column_names)
        if "input_ids" in columns:
            calibration = list(calibration["input_ids"])
        elif "text" in columns:
            calibration = list(calibration["text"])
        else:
            raise ValueError(f"calibration Dataset has columns {columns}; expected a 'text' or 'input_ids' column")
    if isinstance(calibration, str):
        calibration = [calibration]
    if isinstance(calibration, TextFiles):
        return _text_windows(calibration, tokenizer, num_samples, seq_len, seed, owner)

    if isinstance(calibration, torch.Tensor) or (
        isinstance(calibration, Sequence) and calibration and not isinstance(calibration[0], str)
    ):
        return _pretokenised(calibration, num_samples, seq_len, owner)

    if not isinstance(calibration, Sequence) or not all(isinstance(t, str) for t in calibration):
        raise TypeError(
            "calibration must be a list of strings, a datasets.Dataset, a tensor of token ids or a list of "
            f"token-id lists; got {type(calibration).__name__}"
        )
    return _text_windows(calibration, tokenizer, num_samples, seq_len, seed, owner)


def _text_windows(texts, tokenizer, num_samples: int, seq_len: int, seed: int, owner: str) -> torch.Tensor:
    ids = tokenize_texts(texts, tokenizer, max_tokens=max(POOL_FACTOR * num_samples * seq_len, MIN_POOL_TOKENS))
    available = ids.numel() // seq_len
    if available == 0:
        raise ValueError(
            f"calibration text is too short: {ids.numel()} tokens, but one window needs {owner}.max_seq_length="
            f"{seq_len}; give more text or lower max_seq_length"
        )
    if available < num_samples:
        logger.warning(
            "Calibration text gives %d windows of %d tokens; %s.num_calibration_samples asked for %d. Using %d.",
            available, seq_len, owner, num_samples, available,
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=generator)[: min(num_samples, available)].sort().values * seq_len
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def _pretokenised(rows, num_samples: int, seq_len: int, owner: str) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        if rows.dim() == 1:
            rows = rows[None, :]
        if rows.dim() != 2 or rows.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
            raise ValueError(
                f"calibration token ids must be a 1-D or 2-D integer tensor, got {rows.dtype} of shape "
                f"{tuple(rows.shape)}"
            )
        rows = rows[:num_samples, :seq_len].long()
        if rows.numel() == 0:
            raise ValueError("calibration token ids are empty")
        return rows
    for i, row in enumerate(rows):
        if isinstance(row, str) or not isinstance(row, Sequence | torch.Tensor):
            raise ValueError(f"calibration: row {i} is a {type(row).__name__}, expected a sequence of token ids")
        values = row.tolist() if isinstance(row, torch.Tensor) else row
        for j, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(
                    f"calibration: token id {v!r} (row {i}, position {j}) is a {type(v).__name__}; token ids must be "
                    "integers (not cast silently)"
                )
    lengths = {len(r) for r in rows}
    if 0 in lengths:
        raise ValueError("calibration contains an empty token-id sequence")
    length = min(min(lengths), seq_len)
    if len(lengths) > 1:
        logger.warning("Calibration sequences have different lengths; cutting all to %d tokens", length)
    return torch.tensor([list(r)[:length] for r in rows[:num_samples]], dtype=torch.long)


def _is_dataset(obj) -> bool:
    return hasattr(obj, "column_names") and hasattr(obj, "__getitem__") and not isinstance(obj, (list, tuple))
