"""Flag parsing shared by train.py and evaluate.py: config overrides fail with a clear message."""

from __future__ import annotations

import importlib.util
import re
import sys

from absl import flags


def _config_keys(argv: list[str]) -> list[str]:
  """Dotted keys of the config named by --config (best effort, for the error message)."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv:
    spec = argv[argv.index("--config") + 1]
  if not spec:
    return []
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
  except Exception:  # noqa: BLE001 - only feeds the message
    return []

  def walk(c, prefix=""):
    for k, v in c.items():
      if hasattr(v, "items"):
        yield from walk(v, f"{prefix}{k}.")
      else:
        yield f"{prefix}{k}"
  return sorted(walk(config))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, turning an unknown ``--config.KEY`` into a one-line error and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, flags.Error) as e:
    match = re.search(r"'([^']+)'", str(e))
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    if isinstance(e, (AttributeError, KeyError)) and bad:
      name = match.group(1) if match else str(e)
      keys = _config_keys(argv)
      print(f"error: unknown config key {name!r} in {' '.join(bad)}. Valid keys: {', '.join(keys)}",
            file=sys.stderr)
    else:
      print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
