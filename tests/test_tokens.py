import pytest
import torch
from transformers import CLIPTokenizer

from icd.editing.tokens import (
    AlignmentError,
    _global_alignment,
    changed_words,
    is_word_swap,
    refine_alignment,
    replace_mapper,
    word_spans,
)
from icd.models.loading import embedded_model_path


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_pretrained(embedded_model_path() / "tokenizer")


def test_word_spans_follow_the_tokenizer(tok):
    assert word_spans(tok, "a large red circle") == [range(1, 2), range(2, 3), range(3, 4), range(4, 5)]
    spans = word_spans(tok, "a zebra circle")  # an unknown word tokenizes letter by letter
    assert spans[1] == range(2, 7) and spans[2] == range(7, 8)


def test_replace_mapper_maps_words_and_tail(tok):
    m = replace_mapper(tok, "a large red circle on a gray background", "a large blue circle on a gray background")
    k = tok.model_max_length
    assert m.shape == (k, k)
    assert torch.equal(m, torch.eye(k))  # same token counts: a word swap maps position to position
    m = replace_mapper(tok, "a zebra circle", "a red circle")
    assert torch.allclose(m[2:7, 2], torch.full((5,), 0.2))  # five source tokens share the one target token
    assert m[7, 3] == 1.0 and m[8, 4] == 1.0  # later words and EOS shift by four positions
    assert m[0, 0] == 1.0 and m[0, 1:].sum() == 0  # BOS to BOS
    with pytest.raises(AlignmentError, match="same number of words"):
        replace_mapper(tok, "a red circle", "a large red circle")


def test_global_alignment_marks_inserted_tokens():
    assert _global_alignment([1, 2, 3], [1, 9, 2, 3]) == [0, None, 1, 2]
    assert _global_alignment([1, 2, 3], [1, 2, 3]) == [0, 1, 2]


def test_refine_alignment(tok):
    index, alpha = refine_alignment(tok, "a red circle on a gray background", "a large red circle on a gray background")
    assert alpha[2] == 0 and alpha[1] == 1 and index[3] == 2 and index[4] == 3  # "large" is new; "red" shifts
    assert index[9] == 8 and alpha[9] == 1  # EOS aligns with EOS
    same_index, same_alpha = refine_alignment(tok, "a red circle", "a red circle")
    assert torch.equal(same_index, torch.arange(tok.model_max_length)) and bool(same_alpha.all())


def test_changed_words_and_swap_detection():
    assert changed_words("a red circle on a gray background", "a blue circle on a gray background") == ["blue"]
    assert changed_words("a red circle", "a red circle and a blue star") == ["blue", "star"]
    assert is_word_swap("a red circle", "a blue circle") and not is_word_swap("a red circle", "a large red circle")
