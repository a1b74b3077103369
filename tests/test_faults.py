"""The quick form of bench/faults.py: a SIGKILL at a random moment, a damaged latest checkpoint,
and a second run on a workdir in use, each ending bit-equal to the uninterrupted run."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import faults  # noqa: E402  (bench/faults.py)


def test_faults_quick_form(tmp_path):
  result = faults.main(["--trials", "1", "--sigterm", "0", "--damage", "stale_arrays",
                        "--seed", "3", "--workdir", str(tmp_path)])
  names = [t["trial"] for t in result["trials"]]
  assert names == ["sigkill-0", "corrupt-stale_arrays", "double"]
  failed = [t for t in result["trials"] if not t["ok"]]
  assert not failed, failed
