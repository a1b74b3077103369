"""The results table of a scaling sweep: one flat row per run, as JSON lines and as CSV.

The contract between the sweep launcher (which writes it) and the fits and plots (which read it).
``results.jsonl`` is the reference; ``results.csv`` holds the same rows for spreadsheets, its
columns the union of the rows' keys, the fixed columns first, then the rest sorted.

Fixed columns:

* ``run`` (str, unique), ``stage`` ("pretrain" | "finetune" | "fewshot"), ``parent`` (the
  pre-training run a transfer stage starts from, or ""), ``model`` (e.g. "ViT-S/16"), ``family``
  ("ViT" | "hybrid" | "BiT" | "Mixer" | ...), ``status`` ("done" | "failed");
* ``params``, ``data_size`` (pre-training examples), ``steps``, ``batch_size``, ``examples_seen``,
  ``seed`` (int);
* ``train_flops`` (the pre-training compute of the run or of its parent, FLOPs), ``device_hours``
  (float).

Metrics: ``eval/top1`` (upstream), ``transfer/<dataset>/top1`` (a finetune stage),
``fewshot/<dataset>/<k>shot``; accuracies in [0, 1].

Both files read back as the same rows: a fixed column that a row lacks reads as "" (text) or None
(numbers), another column whose value is None or "" is left out of the row, and the CSV's other
cells read as int, float, bool or JSON where they parse as one (floats are written exactly).
"""

from __future__ import annotations

import collections
import csv
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

JSONL = "results.jsonl"
CSV = "results.csv"

TEXT_COLUMNS = ("run", "stage", "parent", "model", "family", "status")
INT_COLUMNS = ("params", "data_size", "steps", "batch_size", "examples_seen", "seed")
FLOAT_COLUMNS = ("train_flops", "device_hours")
FIXED_COLUMNS = ("run", "stage", "parent", "model", "family", "params", "data_size", "steps",
                 "batch_size", "examples_seen", "train_flops", "device_hours", "status", "seed")
STAGES = ("pretrain", "finetune", "fewshot")
DONE = "done"

Row = dict[str, Any]


def write_table(rows: Iterable[Mapping[str, Any]], directory: str | os.PathLike) -> list[Path]:
  """Writes ``results.jsonl`` and ``results.csv`` under ``directory``; returns their paths.

  Each file is replaced atomically, so a reader never sees half a table. Raises ValueError for a
  row without a run name or for two rows with the same one.
  """
  rows = [normalize_row(row) for row in rows]
  names = [row["run"] for row in rows]
  if not all(names):
    raise ValueError("every row of the results table needs a run name")
  duplicates = sorted(name for name, count in collections.Counter(names).items() if count > 1)
  if duplicates:
    raise ValueError(f"run names must be unique in the results table; repeated: {duplicates}")
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)

  lines = "".join(json.dumps(row) + "\n" for row in rows)
  _replace(directory / JSONL, lines)

  columns = table_columns(rows)
  with tempfile.NamedTemporaryFile("w", newline="", dir=directory, delete=False,
                                   prefix=CSV + ".", suffix=".tmp") as file:
    writer = csv.DictWriter(file, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows({key: _csv_cell(value) for key, value in row.items()} for row in rows)
  os.replace(file.name, directory / CSV)
  return [directory / JSONL, directory / CSV]


def read_table(directory: str | os.PathLike) -> list[Row]:
  """The rows of the table in ``directory`` (or of one ``.jsonl`` / ``.csv`` file).

  Reads ``results.jsonl``, or ``results.csv`` where there is no JSON file. Raises
  FileNotFoundError when there is neither.
  """
  path = Path(directory)
  if path.is_dir():
    path = path / JSONL if (path / JSONL).exists() else path / CSV
  if not path.exists():
    raise FileNotFoundError(f"no results table: neither {JSONL} nor {CSV} in {directory}")
  if path.suffix == ".csv":
    with open(path, newline="") as file:
      return [normalize_row(_from_csv(row)) for row in csv.DictReader(file)]
  rows = []
  with open(path) as file:
    for number, line in enumerate(file, 1):
      if line.strip():
        try:
          rows.append(normalize_row(json.loads(line)))
        except json.JSONDecodeError as error:
          raise ValueError(f"{path}:{number}: not a JSON row ({error.msg})") from None
  return rows


def missing(expected_runs: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> list[str]:
  """The expected runs that are absent from ``rows`` or did not finish (status other than done)."""
  return list(missing_reasons(expected_runs, rows))


def missing_reasons(expected_runs: Sequence[str],
                    rows: Iterable[Mapping[str, Any]]) -> dict[str, str]:
  """``missing`` with why: run name -> "absent" or its status (e.g. "failed"), in expected order."""
  status = {row.get("run"): row.get("status") or "no status" for row in rows}
  reasons = {}
  for run in expected_runs:
    if run not in status:
      reasons[run] = "absent"
    elif status[run] != DONE:
      reasons[run] = str(status[run])
  return reasons


def done(rows: Iterable[Mapping[str, Any]]) -> list[Row]:
  """The rows of runs that finished."""
  return [dict(row) for row in rows if row.get("status") == DONE]


def metric_columns(rows: Iterable[Mapping[str, Any]], prefix: str = "") -> list[str]:
  """The metric columns (``eval/``, ``transfer/``, ``fewshot/``) that start with ``prefix``."""
  keys = {key for row in rows for key in row}
  natural = lambda key: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]
  return sorted((key for key in keys if "/" in key and key.startswith(prefix)), key=natural)


def table_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
  """The fixed columns, then every other key of the rows, sorted."""
  others = {key for row in rows for key in row} - set(FIXED_COLUMNS)
  return list(FIXED_COLUMNS) + sorted(others)


def normalize_row(row: Mapping[str, Any]) -> Row:
  """The row with every fixed column ("" for missing text, None for missing numbers), and without
  the other columns whose value is None or ""."""
  out = {key: value for key, value in row.items()
         if key in FIXED_COLUMNS or (value is not None and value != "")}
  for key in TEXT_COLUMNS:
    if out.get(key) is None:
      out[key] = ""
  for key in INT_COLUMNS + FLOAT_COLUMNS:
    out.setdefault(key, None)
  return out


def is_number(value: Any) -> bool:
  """True for a finite int or float (not a bool)."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _replace(path: Path, text: str) -> None:
  with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=path.name + ".",
                                   suffix=".tmp") as file:
    file.write(text)
  os.replace(file.name, path)


def _csv_cell(value: Any) -> Any:
  if value is None:
    return ""
  if isinstance(value, float):
    return repr(value)  # the shortest text that reads back as the same float
  if isinstance(value, (list, dict)):
    return json.dumps(value)
  return value


def _from_csv(cells: Mapping[str, str]) -> Row:
  row: Row = {}
  for key, text in cells.items():
    if key in TEXT_COLUMNS:
      row[key] = text
    elif text == "":
      continue
    elif key in INT_COLUMNS:
      row[key] = _parse(text)
    elif key in FLOAT_COLUMNS:
      row[key] = float(text)
    else:
      row[key] = _parse(text)
  return row


def _parse(text: str) -> Any:
  if text in ("True", "False"):
    return text == "True"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  if text[:1] in "[{":
    try:
      return json.loads(text)
    except json.JSONDecodeError:
      pass
  return text

