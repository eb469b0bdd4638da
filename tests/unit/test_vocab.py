"""Vocab and LabelSet: ids, encode/decode, building, serialisation and their errors."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_rnn.train.exceptions import DataError, TrainError
from stream_rnn.train.vocab import SPECIALS, LabelSet, Vocab


def test_specials_have_fixed_ids() -> None:
    v = Vocab.build(["ab"], "char")
    assert v.itos[:4] == ("<pad>", "<unk>", "<bos>", "<eos>")
    assert (v.pad_id, v.unk_id, v.bos_id, v.eos_id) == (0, 1, 2, 3)
    assert [v.id_of(s) for s in SPECIALS] == [0, 1, 2, 3]


def test_build_orders_by_count_then_token() -> None:
    v = Vocab.build(["b a c a", "c a d"], "word")
    assert v.itos[4:] == ("a", "c", "b", "d")
    assert len(v) == 8


def test_build_min_count_and_max_size() -> None:
    texts = ["aaab", "bbc", "d"]
    assert Vocab.build(texts, "char", min_count=2).itos[4:] == ("a", "b")
    assert Vocab.build(texts, "char", max_size=5).itos == (*SPECIALS, "a")
    assert len(Vocab.build(texts, "char", max_size=4)) == 4
    with pytest.raises(DataError, match="max_size=3 leaves no room"):
        Vocab.build(texts, "char", max_size=3)


def test_build_from_token_lists_with_ints_and_specials_in_data() -> None:
    v = Vocab.build([[17, "x", 17], ["<unk>", "x", 17]], "token")
    assert v.itos[4:] == ("17", "x")
    assert v.id_of(17) == v.id_of("17") == 4


def test_build_rejects_a_single_string_and_bad_level() -> None:
    with pytest.raises(DataError, match="not a single str"):
        Vocab.build("abc", "char")
    with pytest.raises(DataError, match="unknown level 'byte'"):
        Vocab.build(["abc"], "byte")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("level", "text", "tokens"),
    [
        ("char", "a b", ["a", " ", "b"]),
        ("word", " the  cat\tsat\n", ["the", "cat", "sat"]),
        ("token", "12 7 12", ["12", "7", "12"]),
    ],
)
def test_encode_splits_text_by_level(level: str, text: str, tokens: list[str]) -> None:
    v = Vocab.build([tokens], level)  # type: ignore[arg-type]
    assert v.decode(v.encode(text)) == tokens


def test_encode_unknown_to_unk_with_bos_eos() -> None:
    v = Vocab.build(["hello world"], "word")
    ids = v.encode("hello there world", add_bos=True, add_eos=True)
    assert ids == [2, v.id_of("hello"), 1, v.id_of("world"), 3]
    assert v.decode(ids) == ["<bos>", "hello", "<unk>", "world", "<eos>"]
    assert v.id_of("nope") == v.unk_id == 1
    assert v.encode(["hello", 5]) == [v.id_of("hello"), 1]


def test_detok_joins_by_level_and_drops_specials() -> None:
    c = Vocab.build(["ab c"], "char")
    assert c.detok(c.encode("ca b?", add_bos=True, add_eos=True) + [0, 0]) == "ca b"
    w = Vocab.build(["x y"], "word")
    assert w.detok(w.encode("y x", add_eos=True)) == "y x"


def test_decode_rejects_out_of_range_ids() -> None:
    v = Vocab.build(["ab"], "char")
    with pytest.raises(DataError, match="id 6 is out of range for a vocabulary of 6 tokens"):
        v.decode([4, 6])
    with pytest.raises(DataError, match="id -1 is out of range"):
        v.decode([-1])


def test_vocab_is_frozen_and_hashable() -> None:
    v = Vocab.build(["ab"], "char")
    assert v == Vocab.from_dict(v.to_dict())
    assert hash(v) == hash(Vocab.from_dict(v.to_dict()))
    with pytest.raises(AttributeError):
        v.level = "word"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (["<pad>"], "must be a JSON object, got list"),
        ({"level": "char"}, "exactly the fields 'level' and 'itos'"),
        ({"level": "char", "itos": [*SPECIALS], "extra": 1}, "exactly the fields"),
        ({"level": "bytes", "itos": [*SPECIALS]}, "unknown level 'bytes'"),
        ({"level": "char", "itos": "abc"}, "'itos' must be a list of strings"),
        ({"level": "char", "itos": [*SPECIALS, 5]}, "'itos' must be a list of strings"),
        ({"level": "char", "itos": ["a", *SPECIALS]}, "must start with"),
        ({"level": "char", "itos": [*SPECIALS, "a", "a"]}, r"duplicate tokens \['a'\]"),
    ],
)
def test_from_dict_rejects_malformed(data: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        Vocab.from_dict(data)


def test_from_tokens_keeps_given_ids() -> None:
    v = Vocab.from_tokens(["z", "a", "m"], "word")
    assert v.itos == (*SPECIALS, "z", "a", "m")
    assert Vocab.from_tokens(v.itos, "word") == v
    with pytest.raises(DataError, match=r"special tokens \['<eos>'\] appear"):
        Vocab.from_tokens(["a", "<eos>"], "word")
    with pytest.raises(DataError, match="duplicate"):
        Vocab.from_tokens(["a", "b", "a"], "word")


def test_from_file_formats(tmp_path: Path) -> None:
    lines = tmp_path / "vocab.txt"
    lines.write_text("hello\n \r\n\nworld\n", encoding="utf-8")
    assert Vocab.from_file(lines).itos == (*SPECIALS, "hello", " ", "world")
    assert Vocab.from_file(lines, "char").level == "char"

    as_list = tmp_path / "list.json"
    as_list.write_bytes(orjson.dumps(["x", "\n", "é"]))
    assert Vocab.from_file(as_list, "char").itos[4:] == ("x", "\n", "é")

    v = Vocab.build(["abc"], "char")
    as_obj = tmp_path / "vocab.json"
    as_obj.write_bytes(orjson.dumps(v.to_dict()))
    assert Vocab.from_file(as_obj) == v
    with pytest.raises(DataError, match="vocabulary level is 'char', not 'word'"):
        Vocab.from_file(as_obj, "word")


def test_from_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        Vocab.from_file(bad)
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON list of token strings"):
        Vocab.from_file(bad)
    dup = tmp_path / "dup.txt"
    dup.write_text("a\nb\na\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dup\.txt: .*duplicate"):
        Vocab.from_file(dup)


def test_label_set() -> None:
    labels = LabelSet.build(["pl", "de", "pl", "cs"])
    assert labels.labels == ("cs", "de", "pl")
    assert [labels.index(x) for x in ("cs", "de", "pl")] == [0, 1, 2]
    assert len(labels) == 3
    assert LabelSet.from_dict(orjson.loads(orjson.dumps(labels.to_dict()))) == labels
    with pytest.raises(DataError, match="unknown label 'xx'; known labels: 'cs', 'de', 'pl'"):
        labels.index("xx")


def test_label_set_errors() -> None:
    with pytest.raises(DataError, match="duplicates"):
        LabelSet(("a", "a"))
    with pytest.raises(DataError, match="exactly the field 'labels'"):
        LabelSet.from_dict({"label": ["a"]})
    with pytest.raises(DataError, match="must be a list of strings"):
        LabelSet.from_dict({"labels": [1]})
    many = LabelSet.build(f"l{i:02d}" for i in range(25))
    with pytest.raises(DataError, match=r"and 5 more"):
        many.index("nope")
    assert issubclass(DataError, TrainError)


token_lists = st.lists(
    st.lists(st.one_of(st.text(min_size=1, max_size=4), st.integers(0, 10**6)), max_size=12),
    max_size=8,
)


@given(token_lists)
def test_build_encode_decode_round_trip(items: list[list[str | int]]) -> None:
    v = Vocab.build(items, "token")
    for tokens in items:
        ids = v.encode(tokens)
        assert all(0 <= i < len(v) for i in ids)
        expected = [t if isinstance(t, str) else str(t) for t in tokens]
        assert v.decode(ids) == expected
    assert Vocab.from_dict(orjson.loads(orjson.dumps(v.to_dict()))) == v


@given(st.text(max_size=60))
def test_char_detok_inverts_encode_for_known_text(text: str) -> None:
    v = Vocab.build([text], "char")
    assert v.detok(v.encode(text)) == text
    assert len(v) == 4 + len(set(text))
