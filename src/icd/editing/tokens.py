"""Token alignment for Prompt-to-Prompt (docs/baselines.md §5): word positions, the replace mapper, the refine
alignment, and "new words" for reweighting.

Positions index the text encoder's token sequence: BOS at 0 where the tokenizer adds one (CLIP), the prompt's tokens
from there (1 for CLIP, 0 for T5, which adds no BOS: `prefix`), then EOS and padding up to the tokenizer's maximum
length. A word may tokenize into several tokens (SD's CLIP BPE); the embedded models' tokenizers give one token per
world word.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# a small bundled stop-word list (never downloaded at run time, unlike the reference's NLTK data)
STOP_WORDS = frozenset(
    "a an the and or of on in at to with without from by for into onto over under near its it this that these those "
    "is are was were be been being as than then there their his her".split()
)


class AlignmentError(ValueError):
    """Prompts that a controller cannot align (e.g. word replace with different word counts)."""


def words(prompt: str) -> list[str]:
    return prompt.lower().split()


def prefix(tokenizer) -> int:
    """How many special tokens the tokenizer puts before a prompt's tokens: 1 (BOS) for CLIP, 0 for T5."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos is not None and tokenizer("").input_ids[:1] == [bos])


def word_spans(tokenizer, prompt: str) -> list[range]:
    """Token positions of each word of `prompt` (after BOS where the tokenizer adds one; truncated words get
    shortened spans)."""
    limit = tokenizer.model_max_length - 1  # the last position is EOS at best
    spans, pos = [], prefix(tokenizer)
    for word in words(prompt):
        n = len(tokenizer(word, add_special_tokens=False).input_ids)
        spans.append(range(min(pos, limit), min(pos + n, limit)))
        pos += n
    return spans


def _tail(n_src: int, n_tgt: int, length: int) -> list[tuple[int, int]]:
    """Positional pairs for EOS and padding: source position n_src + k <-> target position n_tgt + k."""
    return [(n_src + k, n_tgt + k) for k in range(length - max(n_src, n_tgt))]


def replace_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """[K, K] matrix M with target_maps = source_maps @ M for a word swap (same number of words).

    Word i's target tokens each receive the mean of word i's source tokens, so words that tokenize differently
    spread their attention mass evenly. BOS (if any) maps to BOS; EOS and padding map positionally.
    """
    src, tgt = word_spans(tokenizer, source), word_spans(tokenizer, target)
    if len(src) != len(tgt):
        raise AlignmentError(f"word replace needs prompts with the same number of words ({len(src)} vs {len(tgt)})")
    length, start = tokenizer.model_max_length, prefix(tokenizer)
    rows = [[0.0] * length for _ in range(length)]  # filled on the host, one tensor at the end (no op per entry)
    for i in range(start):
        rows[i][i] = 1.0
    for s, t in zip(src, tgt):
        for j in t:
            for i in s:
                rows[i][j] = 1.0 / len(s)
    n_src = src[-1].stop if src else start
    n_tgt = tgt[-1].stop if tgt else start
    for i, j in _tail(n_src, n_tgt, length):
        rows[i][j] = 1.0
    return torch.tensor(rows, dtype=torch.float32)


def _global_alignment(a: Sequence[int], b: Sequence[int], *, gap: int = -1, match: int = 1, mismatch: int = -1
                      ) -> list[int | None]:
    """Needleman-Wunsch: for each element of `b`, the index of its aligned match in `a` (None: inserted/changed)."""
    n, m = len(a), len(b)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = i * gap
    for j in range(1, m + 1):
        score[0][j] = j * gap
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (match if a[i - 1] == b[j - 1] else mismatch)
            score[i][j] = max(diag, score[i - 1][j] + gap, score[i][j - 1] + gap)
    out: list[int | None] = [None] * m
    i, j = n, m
    while i > 0 and j > 0:
        diag = score[i - 1][j - 1] + (match if a[i - 1] == b[j - 1] else mismatch)
        if score[i][j] == diag:
            if a[i - 1] == b[j - 1]:
                out[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j] + gap:
            i -= 1
        else:
            j -= 1
    return out


def refine_alignment(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [K], alpha [K]): target position j takes source position index[j] where alpha[j] = 1 (aligned,
    unchanged tokens); new tokens (alpha 0) keep their own maps. BOS (if any), EOS and padding align positionally."""
    limit, start = tokenizer.model_max_length, prefix(tokenizer)
    ids_src = tokenizer(source, add_special_tokens=False, truncation=True, max_length=limit - 1 - start).input_ids
    ids_tgt = tokenizer(target, add_special_tokens=False, truncation=True, max_length=limit - 1 - start).input_ids
    aligned = _global_alignment(ids_src, ids_tgt)
    index = torch.arange(limit)
    alpha = torch.ones(limit)
    for j, i in enumerate(aligned):
        if i is None:
            alpha[j + start] = 0.0
        else:
            index[j + start] = i + start
    for i, j in _tail(len(ids_src) + start, len(ids_tgt) + start, limit):
        index[j] = i
    return index, alpha


def changed_words(source: str, target: str) -> list[str]:
    """Target words absent from the source that are not stop-words (the words P2P reweights; docs/method.md §8.2)."""
    known = set(words(source))
    return [w for w in dict.fromkeys(words(target)) if w not in known and w not in STOP_WORDS]


def is_word_swap(source: str, target: str) -> bool:
    """True when the prompts have the same number of words (P2P replace applies); otherwise use refine."""
    return len(words(source)) == len(words(target))
