"""The ``--config.*`` overrides that README.md and the config docstrings show, with the config
each names: what tests/test_config_overrides.py parses and runs."""

from __future__ import annotations

import ast
import dataclasses
import glob
import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_RE = re.compile(r"--config[ =](configs/[\w./\[\]:=,+-]+)")
# Names that stand for a value in the docs, and what the tests put there.
PLACEHOLDERS = {"K": "4", "N": "2"}
GENERIC_SPECS = ("configs/NAME.py", "configs/NAME.py[:ARG]")


@dataclasses.dataclass(frozen=True)
class Documented:
  where: str                       # "README.md:123"
  spec: str                        # "configs/finetune.py:model=ViT-B/16,dataset=cifar10"
  overrides: tuple[str, ...]       # ("--config.pretrained=ViT-B_16.npz", ...)


def _tokens(text: str) -> list[str]:
  try:
    words = shlex.split(text, comments=True)
  except ValueError:
    words = text.split()
  out = []
  for w in words:
    w = w.lstrip("(`").rstrip("`,.;")
    if w.count(")") > w.count("("):
      w = w[:-1]
    if not w.startswith("--config.") or "=" not in w:
      continue
    key, value = w.split("=", 1)
    if not value or value in ("VALUE",) or "KEY" in key:
      continue
    out.append(f"{key}={PLACEHOLDERS.get(value, value)}")
  return out


def _commands(text: str) -> list[tuple[int, int, str]]:
  """(first line, last line, command) of every line (backslash continuations joined) that runs a
  program with ``--config configs/...``."""
  lines, out, i = text.split("\n"), [], 0
  while i < len(lines):
    start, line = i, lines[i]
    while line.rstrip().endswith("\\") and i + 1 < len(lines):
      i += 1
      line = line.rstrip()[:-1] + " " + lines[i]
    if CONFIG_RE.search(line) and re.search(r"\b(train|evaluate)\.py\b", line):
      out.append((start, i, line))
    i += 1
  return out


def _spec(command: str) -> str:
  spec = CONFIG_RE.search(command)[1]
  return "configs/default.py" if spec in GENERIC_SPECS else spec


def from_text(name: str, text: str, own_spec: str | None) -> list[Documented]:
  """Commands become one entry each; the overrides shown elsewhere (prose, lists), grouped by
  paragraph, go to ``own_spec`` or else to the command above them."""
  found = []
  commands = _commands(text)
  command_lines = set()
  for start, end, command in commands:
    command_lines.update(range(start, end + 1))
    tokens = _tokens(command)
    if not CONFIG_RE.search(command)[1] in GENERIC_SPECS or tokens:
      found.append(Documented(f"{name}:{start + 1}", _spec(command), tuple(tokens)))
  lines = text.split("\n")
  paragraph: list[str] = []
  para_start = 0

  def flush():
    tokens = _tokens(" ".join(re.findall(r"`([^`]*)`", " ".join(paragraph))) if name.endswith(".md")
                     else " ".join(paragraph))
    if tokens:
      above = [c for s, _, c in commands if s < para_start]
      spec = own_spec or (_spec(above[-1]) if above else "configs/default.py")
      found.append(Documented(f"{name}:{para_start + 1}", spec, tuple(tokens)))

  in_fence = False
  for i, line in enumerate(lines):
    if line.startswith("```"):
      in_fence = not in_fence
    if i in command_lines or in_fence or not line.strip() or line.lstrip().startswith("- "):
      flush()
      paragraph, para_start = [], i
      if i in command_lines or in_fence or not line.strip():
        continue
    if not paragraph:
      para_start = i
    paragraph.append(line)
  flush()
  return found


def documented() -> list[Documented]:
  found = from_text("README.md", open(os.path.join(ROOT, "README.md")).read(), None)
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    rel = os.path.relpath(path, ROOT)
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    commands = [c for _, _, c in _commands(doc)]
    own = _spec(commands[0]) if commands else None
    if own and not own.startswith(rel):
      own = rel
    found += from_text(rel, doc, own)
  return found
