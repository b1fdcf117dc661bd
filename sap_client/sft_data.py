"""Read the user's JSONL for generative fine-tuning (a decoder learns to write completions) and turn each example
into token ids with a loss mask.

One example per line, in one of three formats, detected from the first example or forced:
- messages: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}, rendered with the
  model's chat template; the loss is on the assistant turns (what the template renders for each, through its end
  of turn), so the model learns to answer, not to write the user's side.
- prompt-completion: {"prompt": "...", "completion": "..."}: prompt tokens, then completion tokens and the end of
  sequence token; the loss is on the completion and the end of sequence.
- text: {"text": "..."}: every token is in the loss.
loss_on="all" puts every token of every format in the loss.

The loss mask is per input token: mask[t] says whether token t is a target, i.e. the loss has a term for
predicting token t from tokens < t (token 0 never is: nothing predicts it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sap_common.errors import InvalidInputError

FORMATS = ("messages", "prompt-completion", "text")
LOSS_ON = ("completion", "all")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SFTExample:
    """One tokenized example: ids and, per token, whether it is a target of the loss. line: its line in the file."""

    input_ids: list[int]
    loss_mask: list[bool]
    line: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SFTDataset:
    examples: list[SFTExample]
    format: str  # the format of the file (detected or forced)
    truncated: int  # examples cut at max_length
    dropped: int  # examples with no target left after truncation

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def target_tokens(self) -> int:
        return sum(sum(e.loss_mask) for e in self.examples)


def read_jsonl(path: Path, format: str = "auto") -> tuple[str, list[tuple[int, dict]]]:
    """(format, [(line number, record)]) of a JSONL file; every record checked against the format, which is the
    first record's unless forced. Blank lines are skipped. InvalidInputError names the file and the line."""
    if format != "auto" and format not in FORMATS:
        raise InvalidInputError(f"unknown data format {format!r}: use auto, {', '.join(FORMATS)}")
    if not path.is_file():
        raise InvalidInputError(f"data file {path} does not exist")
    records: list[tuple[int, dict]] = []
    detected_at = 0
    for number, record in _json_lines(path):
        if not isinstance(record, dict):
            raise InvalidInputError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        if format == "auto":
            format, detected_at = _detect(record, path, number), number
        _check(record, format, path, number, detected_at)
        records.append((number, record))
    if not records:
        raise InvalidInputError(f"{path} holds no examples (one JSON object per line)")
    return format, records


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line; InvalidInputError names the line that is not JSON."""
    try:
        with path.open(encoding="utf-8-sig") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    yield number, json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise InvalidInputError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path} is not UTF-8 text: {exc}") from exc


def _detect(record: dict, path: Path, number: int) -> str:
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    if "text" in record:
        return "text"
    raise InvalidInputError(
        f"{path}, line {number}: cannot tell the format from the keys {sorted(record)}: an example has "
        f'"messages", "prompt" and "completion", or "text"'
    )


def _check(record: dict, format: str, path: Path, number: int, detected_at: int) -> None:
    where = f"{path}, line {number}"
    since = f" (the file is {format}, detected from line {detected_at})" if detected_at else f" (--format {format})"
    if format == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidInputError(f'{where}: "messages" must be a non-empty list of turns{since}')
        for i, turn in enumerate(messages):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                raise InvalidInputError(
                    f'{where}: turn {i} must be {{"role": one of {", ".join(ROLES)}, "content": a string}}, got '
                    f"{json.dumps(turn)[:80]}"
                )
        if not any(turn["role"] == "assistant" for turn in messages):
            raise InvalidInputError(f"{where}: no assistant turn, so nothing to learn")
    elif format == "prompt-completion":
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise InvalidInputError(f'{where}: "{key}" must be a string{since}')
        if not record["completion"]:
            raise InvalidInputError(f'{where}: "completion" is empty, so nothing to learn')
    else:
        if not isinstance(record.get("text"), str) or not record["text"]:
            raise InvalidInputError(f'{where}: "text" must be a non-empty string{since}')


def tokenize_example(record: dict, format: str, tokenizer: Any, loss_on: str = "completion") -> tuple[list, list]:
    """(input_ids, loss_mask) of one checked record."""
    if loss_on not in LOSS_ON:
        raise InvalidInputError(f"unknown --loss-on {loss_on!r}: use {' or '.join(LOSS_ON)}")
    if format == "messages":
        ids, mask = _chat_tokens(record["messages"], tokenizer)
    elif format == "prompt-completion":
        prompt = _ids(tokenizer, record["prompt"], special=True)
        completion = _ids(tokenizer, record["completion"], special=False) + _eos(tokenizer)
        ids, mask = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    else:
        ids = _ids(tokenizer, record["text"], special=True) + _eos(tokenizer)
        mask = [True] * len(ids)
    if loss_on == "all":
        mask = [True] * len(ids)
    if mask:
        mask[0] = False  # nothing predicts the first token
    return ids, mask


def _chat_tokens(messages: list[dict], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """The conversation's ids, with the loss on every assistant turn: the tokens the template adds when the turn is
    appended, after the generation prompt. Works for templates that render a conversation's earlier turns as a
    prefix of it (chatml and most others); any other template is refused."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError(
            "the model's tokenizer has no chat template, so messages cannot be rendered: use prompt/completion or "
            "text examples"
        )
    full = _render(tokenizer, messages, generation_prompt=False)
    mask = [False] * len(full)
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)  # up to the turn's header
        end_ids = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        start = len(before)
        if full[: len(end_ids)] != end_ids or end_ids[:start] != before:
            raise InvalidInputError(
                "the model's chat template does not render a conversation's earlier turns as a prefix of it, so "
                "the assistant turns cannot be located: use prompt/completion examples"
            )
        for t in range(start, len(end_ids)):
            mask[t] = True
    return full, mask


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _ids(tokenizer, text, special=False)  # the template writes its own special tokens


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]


def load_sft_jsonl(
    path: Path,
    tokenizer: Any,
    *,
    format: str = "auto",
    loss_on: str = "completion",
    max_length: int | None = None,
) -> SFTDataset:
    """Every example of a JSONL file, tokenized; cut to max_length tokens (counted in `truncated`), and those left
    with no target dropped (counted in `dropped`); InvalidInputError if none is left."""
    if max_length is not None and max_length < 2:
        raise InvalidInputError(f"max_length must be at least 2 (a token and its target), got {max_length}")
    format, records = read_jsonl(Path(path), format)
    examples, truncated, dropped = [], 0, 0
    for number, record in records:
        ids, mask = tokenize_example(record, format, tokenizer, loss_on)
        if max_length is not None and len(ids) > max_length:
            ids, mask, truncated = ids[:max_length], mask[:max_length], truncated + 1
        if not any(mask):
            dropped += 1
            continue
        examples.append(SFTExample(ids, mask, number))
    if not examples:
        raise InvalidInputError(
            f"{path}: no example keeps a target token"
            + (f" within --max-length {max_length}: raise it" if max_length else "")
        )
    return SFTDataset(examples, format, truncated, dropped)


def read_prompts(path: Path) -> list[dict]:
    """The prompts of `sap-client generate --data FILE.jsonl`: one JSON object per line with "prompt" (a text),
    "messages" (a conversation; a final assistant turn, if any, is left out) or "text" (a beginning to continue);
    other keys (a "completion", say) are ignored. InvalidInputError names the file and the line."""
    if not Path(path).is_file():
        raise InvalidInputError(f"prompts file {path} does not exist")
    prompts = []
    for number, record in _json_lines(Path(path)):
        key = next((k for k in ("messages", "prompt", "text") if isinstance(record, dict) and k in record), None)
        if key is None:
            raise InvalidInputError(f'{path}, line {number}: expected an object with "prompt", "messages" or "text"')
        if key == "messages":
            _check({"messages": record["messages"] + [{"role": "assistant", "content": ""}]}, key, path, number, 0)
        elif not isinstance(record[key], str) or not record[key]:
            raise InvalidInputError(f'{path}, line {number}: "{key}" must be a non-empty string')
        prompts.append({key: record[key]})
    if not prompts:
        raise InvalidInputError(f"{path} holds no prompts (one JSON object per line)")
    return prompts


def generation_prompt(prompt: dict, format: str, tokenizer: Any) -> list[int]:
    """The token ids a generation starts from, rendered as the run's training rendered its prompts: for a run
    trained on messages, a "prompt" becomes a user turn, and a conversation ends in the chat template's generation
    prompt (the assistant's header); otherwise the prompt's text with the tokenizer's special tokens."""
    messages = prompt.get("messages")
    if messages is None and format == "messages":
        messages = [{"role": "user", "content": prompt.get("prompt", prompt.get("text", ""))}]
    if messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInputError("the model's tokenizer has no chat template, so messages cannot be rendered")
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return _render(tokenizer, messages, generation_prompt=True)
    return _ids(tokenizer, prompt.get("prompt", prompt.get("text", "")), special=True)
