"""The JSONL reader of generative fine-tuning: the three formats, the loss mask of each, and the errors that name
the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sap_client.sft_data import load_sft_jsonl, read_jsonl, tokenize_example
from sap_common.errors import InvalidInputError
from tiny_models import make_tokenizer

# A chatml-like template (the layout of SmolLM2-Instruct's) over the tiny word-level vocabulary: unknown words
# such as the role names become [UNK], which is fine for locating the turns.
TEMPLATE = (
    "{% for m in messages %}[CLS] {{ m['role'] }} {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}[CLS] assistant {% endif %}"
)


@pytest.fixture
def tokenizer():
    tok = make_tokenizer(bert_style=False)  # bos [CLS] (added), eos [SEP]
    tok.chat_template = TEMPLATE
    return tok


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _words(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


def test_prompt_completion_puts_the_loss_on_the_completion_and_its_end(tokenizer, tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "w1 w2", "completion": "good movie"}])
    data = load_sft_jsonl(path, tokenizer)
    (example,) = data.examples
    assert data.format == "prompt-completion" and example.line == 1
    assert _words(tokenizer, example.input_ids) == ["[CLS]", "w1", "w2", "good", "movie", "[SEP]"]
    assert example.loss_mask == [False, False, False, True, True, True]
    assert data.target_tokens == 3
    everything = load_sft_jsonl(path, tokenizer, loss_on="all").examples[0]
    assert everything.loss_mask == [False, True, True, True, True, True]  # the first token has no predecessor


def test_text_puts_every_token_but_the_first_in_the_loss(tokenizer, tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"text": "w3 w4 w5"}, "", {"text": "plot"}])  # a blank line is skipped
    data = load_sft_jsonl(path, tokenizer)
    assert data.format == "text" and [e.line for e in data.examples] == [1, 3]
    assert _words(tokenizer, data.examples[0].input_ids) == ["[CLS]", "w3", "w4", "w5", "[SEP]"]
    assert data.examples[0].loss_mask == [False, True, True, True, True]


def test_messages_put_the_loss_on_each_assistant_turn_only(tokenizer, tmp_path):
    conversation = [
        {"role": "system", "content": "w9"},
        {"role": "user", "content": "w1 w2"},
        {"role": "assistant", "content": "good"},
        {"role": "user", "content": "w3"},
        {"role": "assistant", "content": "bad plot"},
    ]
    path = _write(tmp_path / "d.jsonl", [{"messages": conversation}])
    (example,) = load_sft_jsonl(path, tokenizer).examples
    words = _words(tokenizer, example.input_ids)
    targets = [w for w, m in zip(words, example.loss_mask) if m]
    # each assistant turn's content and its end of turn, not the turn's header, nor the user's or system's words
    assert targets == ["good", "[SEP]", "bad", "plot", "[SEP]"]
    assert words.count("[CLS]") == 5 and "w1" in words and "w9" in words


def test_a_template_that_does_not_render_turns_as_prefixes_is_refused(tokenizer, tmp_path):
    tokenizer.chat_template = "{% for m in messages|reverse %}{{ m['content'] }} [SEP] {% endfor %}"
    record = {"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "good"}]}
    with pytest.raises(InvalidInputError, match="prefix"):
        tokenize_example(record, "messages", tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(InvalidInputError, match="no chat template"):
        tokenize_example(record, "messages", tokenizer)


@pytest.mark.parametrize(
    "lines, forced, message",
    [
        (['{"text": "w1"}', "{not json"], "auto", r"line 2: not valid JSON"),
        (
            [{"prompt": "w1", "completion": "w2"}, {"prompt": "w3"}],
            "auto",
            r"line 2: \"completion\" must be a string "
            r"\(the file is prompt-completion, detected from line 1\)",
        ),
        ([{"question": "w1"}], "auto", r"line 1: cannot tell the format from the keys \['question'\]"),
        ([["w1"]], "auto", r"line 1: expected a JSON object, got list"),
        ([{"messages": [{"role": "user", "content": "w1"}]}], "auto", r"line 1: no assistant turn"),
        ([{"messages": [{"role": "bot", "content": "w1"}]}], "auto", r"line 1: turn 0 must be"),
        ([{"prompt": "w1", "completion": ""}], "auto", r"line 1: \"completion\" is empty"),
        ([{"text": "w1"}], "messages", r"line 1: \"messages\" must be a non-empty list of turns \(--format messages\)"),
        ([{"text": "w1"}], "csv", r"unknown data format 'csv'"),
        ([""], "auto", r"holds no examples"),
    ],
)
def test_malformed_input_is_an_error_naming_the_line(lines, forced, message, tmp_path):
    path = _write(tmp_path / "d.jsonl", lines)
    with pytest.raises(InvalidInputError, match=message):
        read_jsonl(path, forced)


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_max_length_cuts_examples_and_drops_those_left_without_a_target(tokenizer, tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [{"prompt": "w1 w2 w3 w4", "completion": "good"}, {"prompt": "w1", "completion": "bad movie"}],
    )
    data = load_sft_jsonl(path, tokenizer, max_length=4)
    assert (data.truncated, data.dropped, len(data)) == (2, 1, 1)  # the first keeps only prompt tokens
    assert _words(tokenizer, data.examples[0].input_ids) == ["[CLS]", "w1", "bad", "movie"]
    assert data.examples[0].line == 2
    with pytest.raises(InvalidInputError, match="no example keeps a target token within --max-length 3"):
        load_sft_jsonl(
            _write(tmp_path / "e.jsonl", [{"prompt": "w1 w2 w3", "completion": "good"}]), tokenizer, max_length=3
        )
    with pytest.raises(InvalidInputError, match="at least 2"):
        load_sft_jsonl(path, tokenizer, max_length=1)
