"""The quick form of bench/faults.py: a SIGKILL at a random moment, a damaged latest checkpoint,
a second run on a workdir in use, and a disk that fills while a checkpoint is written (a tmpfs
mounted for it), each ending bit-equal to the uninterrupted run. (Dead and hung peers:
tests/test_multiprocess.py.)"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import faults  # noqa: E402  (bench/faults.py)


def test_faults_quick_form(tmp_path):
  result = faults.main(["--trials", "1", "--sigterm", "0", "--damage", "stale_arrays",
                        "--seed", "3", "--full-disk", "unchecked", "--dead-peer", "none",
                        "--workdir", str(tmp_path)])
  names = [t["trial"] for t in result["trials"]]
  assert names == ["sigkill-0", "corrupt-stale_arrays", "double", "full-disk-unchecked"]
  failed = [t for t in result["trials"] if not t["ok"]]
  assert not failed, failed
