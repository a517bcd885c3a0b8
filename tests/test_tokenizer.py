from icd import world
from icd.models import tiny


def test_every_world_word_is_one_token(tmp_path):
    tok = tiny.build_tokenizer(tmp_path / "tok", world.vocabulary())
    assert tok.model_max_length == tiny.MAX_LENGTH
    for word in world.vocabulary():
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))  # BOS, word, EOS


def test_longest_caption_fits(tmp_path):
    tok = tiny.build_tokenizer(tmp_path / "tok", world.vocabulary())
    caption = world.sample_scene(5, n_objects=3).caption
    assert len(tok(caption).input_ids) <= tiny.MAX_LENGTH


def test_empty_prompt_and_foreign_words_tokenize(tmp_path):
    tok = tiny.build_tokenizer(tmp_path / "tok", world.vocabulary())
    assert tok("").input_ids == [tok.bos_token_id, tok.eos_token_id]
    assert len(tok("zebra").input_ids) > 3  # falls back to letters, never crashes
