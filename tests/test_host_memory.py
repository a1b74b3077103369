"""Huge pages for XLA's per-step host allocations: the glibc tunable, the re-execution, bad input."""

import os
import subprocess
import sys

import pytest

from vit_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_env_adds_the_tunable_once_and_keeps_others():
  env = host_memory.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=0",
                                    "PATH": "/bin"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
  assert env["PATH"] == "/bin"
  assert host_memory.huge_pages_env(env) == env
  assert host_memory.huge_pages_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_keep_replaces_the_other_policies_tunables():
  keep = host_memory.policy_env("keep", {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=0"})
  assert keep["GLIBC_TUNABLES"].split(":") == [
      "glibc.malloc.tcache_count=0", "glibc.malloc.hugetlb=1", "glibc.malloc.mmap_max=0",
      f"glibc.malloc.trim_threshold={1 << 40}"]
  assert host_memory.policy_env("hugepages", keep)["GLIBC_TUNABLES"] == (
      "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1")
  only_keep = {"GLIBC_TUNABLES": ":".join(host_memory.TUNABLES["keep"])}
  assert "GLIBC_TUNABLES" not in host_memory.policy_env("release", only_keep)


def test_bad_policy():
  with pytest.raises(ValueError, match=r"host memory policy 'big' is not one of \('hugepages', 'keep', 'release'\)"):
    host_memory.apply("big")


def test_reexecutes_once_with_the_tunable(tmp_path):
  script = tmp_path / "probe.py"
  script.write_text(
      "import os, sys\n"
      "print('start', sys.argv[1:], flush=True)\n"
      "from vit_jax import host_memory\n"
      "host_memory.use_huge_pages()\n"
      "print('tunables', os.environ.get('GLIBC_TUNABLES', ''))\n")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run([sys.executable, "-u", str(script), "a", "--b=1"], capture_output=True, text=True,
                       env=env, check=True).stdout.splitlines()
  if host_memory.why_unsupported() is None:
    assert out == ["start ['a', '--b=1']", "start ['a', '--b=1']", "tunables glibc.malloc.hugetlb=1"]
  else:  # nothing to gain here: no re-execution
    assert out == ["start ['a', '--b=1']", "tunables "]


@pytest.mark.parametrize("policy,expected", [("hugepages", "glibc.malloc.hugetlb=1"), ("release", "")])
def test_another_policys_inherited_tunables_are_replaced(tmp_path, policy, expected):
  script = tmp_path / "probe.py"
  script.write_text("import os, sys\n"
                    "from vit_jax import host_memory\n"
                    f"host_memory.apply({policy!r})\n"
                    "print('tunables', os.environ.get('GLIBC_TUNABLES', ''))\n")
  env = {**os.environ, "GLIBC_TUNABLES": ":".join(host_memory.TUNABLES["keep"])}
  out = subprocess.run([sys.executable, "-u", str(script)], capture_output=True, text=True, env=env,
                       check=True).stdout.split()
  if host_memory.why_unsupported() is None:
    assert out == ["tunables", expected] if expected else out == ["tunables"]


def test_train_py_rejects_an_unknown_policy():
  proc = subprocess.run([sys.executable, "train.py", "--config", "configs/default.py", "--workdir", "/tmp/x",
                         "--host_memory", "retain"], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode != 0
  assert "--host_memory 'retain' is not one of ['hugepages', 'keep', 'release']" in proc.stderr
