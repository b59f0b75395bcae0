import pytest

from pgen_engine.data.text_tokenizer import ByteTokenizer, load_text_tokenizer
from pgen_engine.models.special_tokens import SpecialTokens


def test_byte_tokenizer_roundtrip(tmp_path):
    tok = load_text_tokenizer(None, SpecialTokens.builtin())
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 262
    text = "Héllo, wörld ✓\n"
    ids = tok.encode(text)
    assert min(ids) >= 6 and max(ids) < 262 and len(ids) == len(text.encode())
    assert tok.decode([1] + ids + [2, 3]) == text
    # a folder without tokenizer files also falls back to bytes
    assert isinstance(load_text_tokenizer(tmp_path, SpecialTokens.builtin()), ByteTokenizer)


def test_errors(tmp_path):
    with pytest.raises(ValueError):
        ByteTokenizer(SpecialTokens.janus_pro())
    with pytest.raises(FileNotFoundError):
        load_text_tokenizer(tmp_path / "missing", SpecialTokens.builtin())
    # a corrupt tokenizer.json used to surface as transformers' bare JSONDecodeError (pgen eval)
    (tmp_path / "tokenizer.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"cannot load the tokenizer \(tokenizer\.json\): JSONDecodeError") as e:
        load_text_tokenizer(tmp_path, SpecialTokens.builtin())
    # a user error: train.py / pgen print its one line instead of a traceback
    from pgen_engine.errors import PgenUserError

    assert isinstance(e.value, PgenUserError)


def test_hf_tokenizer_from_folder(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<s{j}>": j for j in range(6)}
    for j, w in enumerate(["hello", "world", "[UNK]"]):
        vocab[w] = 6 + j
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]").save_pretrained(tmp_path)
    tok = load_text_tokenizer(tmp_path, SpecialTokens.builtin())
    assert tok.encode("hello world") == [6, 7]
    assert tok.vocab_size == 9
    with pytest.raises(ValueError, match="cannot hold"):
        load_text_tokenizer(tmp_path, SpecialTokens.janus_pro())
