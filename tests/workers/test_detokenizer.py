"""The streaming detokenizer: its pieces are, token by token, those of decoding the whole reply again
(the old implementation, kept here as the oracle), so their concatenation is
`tokenizer.decode(ids, skip_special_tokens=True)`; a piece never ends in half a UTF-8 character; and a
token costs the same decoding work at the end of a 2,000-token reply as at its start (counted, not
timed)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models

from lessserve.workers.model_loader import load_tokenizer
from lessserve.workers.reply import Detokenizer

PROPS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
TEXTS = [
    "Hello, world! A plain English sentence.",
    "café naïve façade Ørsted Ångström déjà vu",
    "日本語のテキストと中文和한국어",
    "emoji 🎉👍🏽🧑‍🚀 and flags 🇫🇷 mixed with text",
    "Ελληνικά, русский, العربية, עברית",
    "  leading spaces,\n\nnew lines\tand tabs  ",
    "<|im_start|>user\nHi 😀<|im_end|>\n<|im_start|>assistant\n你好<|im_end|> after <|endoftext|>the end",
]


def whole_pieces(tok, ids: list[int]) -> list[str]:
    """The old Detokenizer: decode every prefix whole, send what grew unless it ends mid-character."""
    out, sent = [], 0
    for i in range(1, len(ids) + 1):
        text = tok.decode(ids[:i], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            out.append("")
            continue
        out.append(text[sent:])
        sent = len(text)
    return out


def pieces(tok, ids: list[int]) -> list[str]:
    d = Detokenizer(tok)
    return [d.push(t) for t in ids]


@pytest.fixture(scope="module")
def tok(default_ckpt):
    return load_tokenizer(default_ckpt.folder)


@pytest.fixture(scope="module")
def partial_ids(tok) -> list[int]:
    """Ids that hold part of a UTF-8 character (they decode to U+FFFD alone)."""
    return [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]


def test_default_tokenizer_streams_through_decode_stream(tok):
    assert Detokenizer(tok).backend is tok.backend_tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_equal_decoding_the_whole_reply(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    got = pieces(tok, ids)
    assert got == whole_pieces(tok, ids)
    assert "".join(got) == tok.decode(ids, skip_special_tokens=True)
    assert not any(p.endswith("\ufffd") for p in got)


def test_multibyte_character_is_held_until_complete(tok):
    ids = tok("🎉", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # byte-level BPE splits the emoji
    assert pieces(tok, ids) == [""] * (len(ids) - 1) + ["🎉"]


@PROPS
@given(data=st.data())
def test_random_id_sequences_match_the_oracle(tok, partial_ids, data):
    special = sorted(tok.all_special_ids)
    one = st.one_of(st.integers(0, len(tok) - 1), st.sampled_from(partial_ids), st.sampled_from(special))
    ids = data.draw(st.lists(one, min_size=1, max_size=40))
    got = pieces(tok, ids)
    assert got == whole_pieces(tok, ids)
    assert not any(p.endswith("\ufffd") for p in got)
    full = tok.decode(ids, skip_special_tokens=True)
    if not full.endswith("\ufffd"):
        assert "".join(got) == full


class CountingDecoder:
    """A custom tokenizers decoder that counts the tokens it is asked to decode."""

    def __init__(self, inner):
        self.inner, self.n = inner, 0

    def decode(self, tokens: list[str]) -> str:
        return "".join(self.decode_chain(tokens))

    def decode_chain(self, tokens: list[str]) -> list[str]:
        self.n += len(tokens)
        return [self.inner.decode(tokens)]


def per_token_work(tok, ids: list[int]) -> tuple[list[int], str]:
    """(tokens decoded by each push, the streamed text), through a copy of `tok` whose decoder counts."""
    counted = copy.deepcopy(tok)
    counter = CountingDecoder(counted.backend_tokenizer.decoder)
    counted.backend_tokenizer.decoder = decoders.Decoder.custom(counter)
    d, work, text = Detokenizer(counted), [], ""
    for t in ids:
        before = counter.n
        text += d.push(t)
        work.append(counter.n - before)
    return work, text


def test_a_token_costs_the_same_at_the_end_of_a_long_reply(tok):
    para = ("The keeper climbed the stairs at dusk 🌊, lit the lamp and wrote in the log: naïve gulls, "
            "a café ship, 灯台 and 바다. ")
    ids = tok(para * 80, add_special_tokens=False)["input_ids"][:2000]
    assert len(ids) == 2000
    work, text = per_token_work(tok, ids)
    assert text == tok.decode(ids, skip_special_tokens=True)  # the counting decoder decodes the same
    first, last = sum(work[:100]) / 100, sum(work[-100:]) / 100
    assert first > 0
    assert last <= 2 * first, (first, last)  # decoding whole again: ~1,950 vs ~50 tokens per push


def llama2_style_tokenizer():
    """A tiny sentencepiece-like tokenizer: byte fallback, `▁` for spaces, the first space stripped."""
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for w in ["▁a", "a", "▁", "b", "▁hello", "»", "é"]:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=False), vocab


def test_byte_fallback_tokenizer_with_a_stripped_first_space():
    tok, v = llama2_style_tokenizer()
    ids = [v["▁hello"], v["▁a"], v["<0xC3>"], v["<0xA9>"], 1, v["▁"], v["b"], 2, v["é"], v["<0xF0>"], v["<0x9F>"],
           v["<0x8E>"], v["<0x89>"]]
    got = pieces(tok, ids)
    assert got == whole_pieces(tok, ids)
    assert "".join(got) == tok.decode(ids, skip_special_tokens=True) == "hello aé bé🎉"


def test_bytes_that_are_never_utf8_do_not_break_the_stream():
    """Under byte fallback, [CD 83] decodes to a character but [CD 83 89 8F] to four U+FFFD: the stream's
    prefix no longer matches (tokenizers raises "Invalid prefix encountered"); the stream restarts."""
    tok, v = llama2_style_tokenizer()
    ids = [v[f"<0x{b:02X}>"] for b in (0xCD, 0x83, 0x89, 0x8F)] + [v["é"], v["<0xA1>"], v["▁a"]]
    got = pieces(tok, ids)
    assert not any(p.endswith("\ufffd") for p in got)
    assert got[-1].endswith(" a")


class DecodeOnly:
    """A tokenizer with no `tokenizers` backend: only `decode`."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_a_tokenizer_without_a_backend_is_decoded_whole(tok):
    ids = tok(TEXTS[3] + TEXTS[6], add_special_tokens=False)["input_ids"]
    d = Detokenizer(DecodeOnly(tok))
    assert d.backend is None
    assert [d.push(t) for t in ids] == whole_pieces(tok, ids)
