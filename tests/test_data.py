"""Units of sap_client.data: reading labelled CSVs, label ids, and seeded stratified splits (no gRPC)."""

from __future__ import annotations

from collections import Counter

import pytest

from sap_client.data import TextDataset, load_labelled_csv, load_texts, stratified_split
from sap_common.errors import InvalidInputError
from tiny_models import learnable_rows, write_csv


def _dataset(counts: dict[str, int]) -> TextDataset:
    names = sorted(counts)
    texts, labels = [], []
    for cls, name in enumerate(names):
        for i in range(counts[name]):
            texts.append(f"{name} example {i}")
            labels.append(cls)
    return TextDataset(texts, labels, names)


# --- loading and labels -----------------------------------------------------------------------


def test_string_labels_sort_alphabetically(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("a b", "pos"), ("c d", "neg"), ("e f", "neutral"), ("g h", "pos")])
    data = load_labelled_csv(path)
    assert data.label_names == ["neg", "neutral", "pos"]
    assert data.labels == [2, 0, 1, 2]
    assert data.texts == ["a b", "c d", "e f", "g h"]
    assert len(data) == 4


def test_csv_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext,label\nfine day,pos\nbad day,neg\n".encode("utf-8"))
    data = load_labelled_csv(path)
    assert data.texts == ["fine day", "bad day"] and data.label_names == ["neg", "pos"]


def test_integer_labels_sort_numerically(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("a", "10"), ("b", "2"), ("c", "10"), ("d", "2")])
    data = load_labelled_csv(path)
    assert data.label_names == ["2", "10"]  # not the string order ["10", "2"]
    assert data.labels == [1, 0, 1, 0]


def test_integer_labels_keep_their_ids(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("a", "1"), ("b", "0"), ("c", "2")])
    assert load_labelled_csv(path).labels == [1, 0, 2]


def test_custom_columns_and_whitespace(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("  hello  ", " yes "), ("bye", "no")], header=("sentence", "answer"))
    data = load_labelled_csv(path, "sentence", "answer")
    assert data.texts == ["hello", "bye"] and data.label_names == ["no", "yes"]


def test_text_with_commas_and_quotes_round_trips(tmp_path):
    text = 'a, "quoted" text,\nwith a newline'
    path = write_csv(tmp_path / "d.csv", [(text, "a"), ("plain", "b")])
    assert load_labelled_csv(path).texts[0] == text


def test_eval_labels_must_be_among_training_labels(tmp_path):
    path = write_csv(tmp_path / "eval.csv", [("a", "pos"), ("b", "neutral"), ("c", "other")])
    with pytest.raises(InvalidInputError, match=r"\['neutral', 'other'\].*not in the training data"):
        load_labelled_csv(path, label_names=["neg", "pos"])


def test_eval_labels_use_training_ids(tmp_path):
    # an eval set with only one class is fine: it takes the training label ids
    path = write_csv(tmp_path / "eval.csv", [("a", "pos"), ("b", "pos")])
    data = load_labelled_csv(path, label_names=["neg", "pos"])
    assert data.labels == [1, 1] and data.label_names == ["neg", "pos"]


def test_empty_text_cell_names_the_line(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("a", "x"), ("b", "y"), ("   ", "x")])
    with pytest.raises(InvalidInputError, match=r"d\.csv:4: column 'text' is empty"):
        load_labelled_csv(path)


def test_empty_label_cell_names_the_line(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("a", "x"), ("b", "")])
    with pytest.raises(InvalidInputError, match=r"d\.csv:3: column 'label' is empty"):
        load_labelled_csv(path)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_labelled_csv(tmp_path / "nope.csv")


def test_missing_column_names_it_and_the_header(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("a", "x")], header=("body", "label"))
    with pytest.raises(InvalidInputError, match=r"'text' is missing.*'body', 'label'"):
        load_labelled_csv(path)


def test_header_only_and_empty_files(tmp_path):
    with pytest.raises(InvalidInputError, match="no data rows"):
        load_labelled_csv(write_csv(tmp_path / "h.csv", []))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InvalidInputError, match="missing"):
        load_labelled_csv(tmp_path / "empty.csv")


def test_single_class_is_refused(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("a", "x"), ("b", "x")])
    with pytest.raises(InvalidInputError, match="single class"):
        load_labelled_csv(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\n\xff\xfe caf\xe9,x\n")
    with pytest.raises(InvalidInputError, match="UTF-8"):
        load_labelled_csv(path)


def test_load_texts_keeps_empty_texts(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("a", "x"), ("", "y")])
    assert load_texts(path) == ["a", ""]


# --- stratified split -------------------------------------------------------------------------


def test_split_is_reproducible_and_depends_on_the_seed():
    data = _dataset({"a": 50, "b": 30, "c": 20})
    first = stratified_split(data, 0.2, seed=3)
    again = stratified_split(data, 0.2, seed=3)
    other = stratified_split(data, 0.2, seed=4)
    assert first[0].texts == again[0].texts and first[1].texts == again[1].texts
    assert first[1].texts != other[1].texts


def test_split_is_disjoint_covering_and_stratified():
    counts = {"a": 50, "b": 30, "c": 20}
    data = _dataset(counts)
    train, held = stratified_split(data, 0.2, seed=0)
    assert set(train.texts).isdisjoint(held.texts)
    assert sorted(train.texts + held.texts) == sorted(data.texts)
    assert len(held) == 20
    held_counts = Counter(held.labels)
    train_counts = Counter(train.labels)
    for cls, name in enumerate(data.label_names):
        assert held_counts[cls] == round(counts[name] * 0.2)
        assert train_counts[cls] == counts[name] - held_counts[cls]
    assert train.label_names == held.label_names == data.label_names
    # labels travel with their texts
    for part in (train, held):
        assert all(text.startswith(part.label_names[label]) for text, label in zip(part.texts, part.labels))


def test_small_classes_keep_an_example_on_both_sides():
    data = _dataset({"big": 40, "tiny": 2, "small": 3})
    train, held = stratified_split(data, 0.1, seed=0)
    for cls in range(3):
        assert cls in train.labels and cls in held.labels


def test_split_of_learnable_rows_is_balanced(tmp_path):
    data = load_labelled_csv(write_csv(tmp_path / "d.csv", learnable_rows(200)))
    train, held = stratified_split(data, 0.25, seed=0)
    assert Counter(held.labels) == {0: 25, 1: 25}
    assert Counter(train.labels) == {0: 75, 1: 75}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_fraction_out_of_range(fraction):
    with pytest.raises(InvalidInputError, match="eval fraction"):
        stratified_split(_dataset({"a": 5, "b": 5}), fraction, seed=0)


def test_split_that_leaves_no_eval_examples():
    with pytest.raises(InvalidInputError, match="no eval examples"):
        stratified_split(_dataset({"a": 1, "b": 1}), 0.5, seed=0)
