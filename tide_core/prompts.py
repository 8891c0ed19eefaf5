"""Prompts as data: the prompt set of a text-conditional run, read from a file and checked before any work.

A prompt file is plain text (one prompt a line; blank lines and lines starting with ``#`` are skipped), CSV
(a ``prompt`` column, optional ``tags``: words separated by ``;`` or ``,``) or Parquet (the same columns).
Samples take the prompts round-robin by sample id, so ``num_samples`` larger than the set gives several
images (seeds) per prompt. A prompt's id is a hash of its text: the same prompt has the same id in every run.

Concepts are what the feature tables associate features with: for a prompt, its words (lower-cased, without
a few function words) and its tags; for a class-conditional run, the class names.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

PROMPT_COLUMN = "prompt"
TAGS_COLUMN = "tags"
# Words that name no concept: a feature "of the word 'the'" would be a feature of every prompt.
STOPWORDS = frozenset("a an the of on in at to with and or for by from as is are this that its".split())
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


class PromptError(ValueError):
    """The prompt file cannot be used; the message names the file and what to change."""


@dataclass(frozen=True)
class Prompt:
    text: str
    tags: tuple[str, ...] = ()

    @property
    def prompt_id(self) -> str:
        return "p" + hashlib.sha256(self.text.encode()).hexdigest()[:11]

    def words(self) -> list[str]:
        """The prompt's concept words: lower-cased, in order of first use, function words left out."""
        return list(dict.fromkeys(w for w in _WORD.findall(self.text.lower()) if w not in STOPWORDS))


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a run, in file order (the condition index of a prompt is its position)."""

    prompts: tuple[Prompt, ...]
    source: str = ""  # the file read
    sha256: str = field(default="", compare=False)  # of its bytes: what the run's provenance records

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]


def read_prompt_file(path: str | Path) -> PromptSet:
    """The prompts of a .txt, .csv or .parquet file; PromptError for a missing, empty or unreadable file, one
    that is not UTF-8, or a table without a ``prompt`` column."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"sampling.prompts={str(path)!r} does not exist: point it at a .txt, .csv or .parquet "
                          "file of prompts")
    data = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise PromptError(f"prompt file {path} is not UTF-8 text ({err.reason} at byte {err.start}): save it "
                              "as UTF-8") from None
        rows = _csv_rows(path, text) if suffix == ".csv" else _lines(text)
    prompts = tuple(Prompt(r[0].strip(), tuple(_tags(r[1]))) for r in rows if r[0].strip())
    if not prompts:
        raise PromptError(f"prompt file {path} holds no prompts: one prompt a line (.txt), or a '{PROMPT_COLUMN}' "
                          "column (.csv, .parquet)")
    return PromptSet(prompts, source=str(path), sha256=hashlib.sha256(data).hexdigest())


def _lines(text: str) -> list[tuple[str, str]]:
    return [(line, "") for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _csv_rows(path: Path, text: str) -> list[tuple[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip().lower() for c in reader.fieldnames or []]
    if PROMPT_COLUMN not in columns:
        raise PromptError(f"prompt file {path} has no '{PROMPT_COLUMN}' column (columns: {columns}): name the "
                          f"column of prompts '{PROMPT_COLUMN}' (and an optional '{TAGS_COLUMN}')")
    names = dict(zip(columns, reader.fieldnames, strict=True))
    return [(row[names[PROMPT_COLUMN]] or "", row.get(names.get(TAGS_COLUMN, ""), "") or "") for row in reader]


def _parquet_rows(path: Path) -> list[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise PromptError(f"prompt file {path} is not a readable Parquet file: {err}") from None
    columns = {c.lower(): c for c in table.column_names}
    if PROMPT_COLUMN not in columns:
        raise PromptError(f"prompt file {path} has no '{PROMPT_COLUMN}' column (columns: {table.column_names})")
    texts = [str(v) if v is not None else "" for v in table.column(columns[PROMPT_COLUMN]).to_pylist()]
    tags = (table.column(columns[TAGS_COLUMN]).to_pylist() if TAGS_COLUMN in columns else [""] * len(texts))
    return [(t, ";".join(g) if isinstance(g, list) else (g or "")) for t, g in zip(texts, tags, strict=True)]


def _tags(text: str) -> list[str]:
    return list(dict.fromkeys(t.strip().lower() for t in re.split(r"[;,]", text) if t.strip()))
