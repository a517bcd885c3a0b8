"""A CLIP-format BPE tokenizer built offline from the world's vocabulary.

transformers' `CLIPTokenizer` splits a word into characters unless `merges.txt` holds merges that rebuild it. We
learn those merges with a plain byte-pair-encoding loop over the world's words (each word weighted once), so every
world word becomes exactly one token, e.g. ``"red" -> ["red</w>"]``. Letters a-z stay in the vocabulary, so any
lowercase word still tokenizes (character by character); prompts are validated against the world vocabulary before
they reach the tokenizer.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"


def learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that turn every word of `words` into a single symbol.

    Greedy BPE (Sennrich et al. 2016): repeatedly merge the most frequent adjacent pair, ties broken
    lexicographically, until no word has two symbols. Applying the merges in this order re-creates the learned
    segmentation, which is what the BPE tokenizer does at run time.
    """
    segmented = {w: [*w[:-1], w[-1] + EOW] for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for symbols in segmented.values() for p in zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, symbols in segmented.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            segmented[w] = out


def write_tokenizer(directory: str | Path, words: Sequence[str], *, max_length: int) -> None:
    """Write vocab.json, merges.txt and the tokenizer configs of a `CLIPTokenizer` for `words`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(words)
    letters = list(string.ascii_lowercase)
    tokens = [*letters, *(c + EOW for c in letters)] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=1) + "\n")
