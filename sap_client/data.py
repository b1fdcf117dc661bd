"""Read the user's labelled CSV, map labels to class ids, and make seeded, stratified splits."""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sap_common.errors import InvalidInputError


@dataclass
class TextDataset:
    """Texts with class ids; label_names[i] is the user's own name of class i."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> TextDataset:
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)


def read_rows(path: Path, columns: list[str]) -> list[dict[str, str]]:
    """The rows of a CSV with a header, checking that the file and the columns exist."""
    if not path.is_file():
        raise InvalidInputError(f"data file {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel writes a BOM
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise InvalidInputError(
                    f"{path}: column {missing[0]!r} is missing; the header has "
                    f"{', '.join(map(repr, header)) or 'no columns'}"
                )
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path} is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise InvalidInputError(f"{path} is not a valid CSV: {exc}") from exc
    if not rows:
        raise InvalidInputError(f"{path} has a header but no data rows")
    return rows


def _label_order(values: set[str]) -> list[str]:
    """Integers sort numerically (so 0,1,2 stay ids 0,1,2), anything else alphabetically."""
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def load_labelled_csv(
    path: Path, text_column: str = "text", label_column: str = "label", label_names: list[str] | None = None
) -> TextDataset:
    """Load a training/eval CSV; with label_names given (an eval set), labels must be among them."""
    rows = read_rows(path, [text_column, label_column])
    texts, raw = [], []
    for line, row in enumerate(rows, start=2):
        text, label = (row.get(text_column) or "").strip(), (row.get(label_column) or "").strip()
        if not text:
            raise InvalidInputError(f"{path}:{line}: column {text_column!r} is empty")
        if not label:
            raise InvalidInputError(f"{path}:{line}: column {label_column!r} is empty")
        texts.append(text)
        raw.append(label)
    if label_names is None:
        label_names = _label_order(set(raw))
        if len(label_names) < 2:
            raise InvalidInputError(
                f"{path}: column {label_column!r} has a single class ({label_names[0]!r}); "
                f"training a classifier needs at least two"
            )
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(raw) - index.keys())
    if unknown:
        raise InvalidInputError(f"{path}: labels {unknown[:5]} were not in the training data ({label_names})")
    return TextDataset(texts, [index[label] for label in raw], label_names)


def load_texts(path: Path, text_column: str = "text") -> list[str]:
    """Texts of an unlabelled CSV (for prediction); empty texts are kept as empty strings."""
    return [(row.get(text_column) or "").strip() for row in read_rows(path, [text_column])]


def stratified_split(data: TextDataset, fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Split into (train, eval) with about `fraction` of every class in eval, reproducibly."""
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"eval fraction must be in (0, 1), got {fraction}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(data.labels):
        by_class[label].append(i)
    rng = random.Random(seed)
    train, held = [], []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        n_eval = round(len(members) * fraction)
        n_eval = min(max(n_eval, 1), len(members) - 1) if len(members) > 1 else 0
        held += members[:n_eval]
        train += members[n_eval:]
    if not held:
        raise InvalidInputError(
            f"an eval fraction of {fraction} leaves no eval examples; use more data or --eval EVAL.csv"
        )
    return data.subset(sorted(train)), data.subset(sorted(held))
