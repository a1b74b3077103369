"""train.py, evaluate.py and predict.py share one process set-up (vit_jax/command_line.py): importing a
script sets nothing up, running one applies --host_memory, --fake_devices, --xla_preset and
--cpu_matmul before JAX starts, and a bad value is one clear line."""

import os
import subprocess
import sys

import pytest

from vit_jax import command_line, host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train", "evaluate", "predict")


def env():
  e = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS", "JAX_PLATFORMS")}
  e["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return e


def python(*args, **kwargs):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env(),
                        timeout=120, **kwargs)


IMPORT_PROBE = """
import importlib.util, os, sys
command_line_flags = ("xla_preset", "host_memory", "fake_devices", "cpu_matmul")
print("start", flush=True)
spec = importlib.util.spec_from_file_location("script_under_test", {path!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from absl import flags
print("jax imported:", "jax" in sys.modules)
print("process flags:", all(name in flags.FLAGS for name in command_line_flags))
print("environment:", [os.environ.get(k) for k in ("GLIBC_TUNABLES", "XLA_FLAGS", "JAX_PLATFORMS")])
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_importing_a_script_neither_imports_jax_nor_re_executes(script):
  out = python("-c", IMPORT_PROBE.format(path=os.path.join(ROOT, f"{script}.py")))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.splitlines() == ["start", "jax imported: False", "process flags: True",
                                     "environment: [None, None, None]"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag,message", [
    ("--xla_preset=fastest", "--xla_preset 'fastest' is not one of ['cpu', 'none']"),
    ("--host_memory=retain", "--host_memory 'retain' is not one of ['hugepages', 'keep', 'release']"),
    ("--cpu_matmul=blis", "--cpu_matmul 'blis' is not one of ['xla', 'mkl', 'openblas']"),
    ("--fake_devices=0", "--fake_devices '0' is not a positive integer"),
])
def test_a_bad_process_flag_is_one_clear_line(script, flag, message):
  out = python(f"{script}.py", "--config", "configs/default.py", flag, "image.png")
  assert out.returncode == 2
  assert out.stderr == f"error: {message}\n"


def test_the_flags_are_applied_before_jax_starts():
  code = ("import os, sys\n"
          "from vit_jax import command_line\n"
          "command_line.prepare_process(sys.argv)\n"
          "print(os.environ.get('GLIBC_TUNABLES'), os.environ['JAX_PLATFORMS'], os.environ['XLA_FLAGS'],\n"
          "      os.environ['VIT_JAX_CPU_MATMUL'])\n")
  out = python("-c", code, "--host_memory", "release", "--fake_devices", "3", "--xla_preset=none",
               "--xla_preset=cpu", "--cpu_matmul=openblas")  # the last one counts, as for absl
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["None", "cpu", "--xla_force_host_platform_device_count=3",
                                "--xla_cpu_experimental_ynn_fusion_type=reduce", "openblas"]


def test_huge_pages_by_default_re_execute_the_program_once():
  code = ("import os, sys\n"
          "print('start', flush=True)\n"
          "from vit_jax import command_line\n"
          "command_line.prepare_process(sys.argv)\n"
          "print(os.environ.get('GLIBC_TUNABLES'))\n")
  out = python("-c", code)
  assert out.returncode == 0, out.stderr[-2000:]
  if host_memory.why_unsupported() is None:
    assert out.stdout.splitlines() == ["start", "start", "glibc.malloc.hugetlb=1"]
  else:  # nothing to gain here: no re-execution
    assert out.stdout.splitlines() == ["start", "None"]


def test_a_process_flag_from_a_flagfile_is_refused(tmp_path):
  flagfile = tmp_path / "flags.txt"
  flagfile.write_text("--xla_preset=none\n")
  out = python("train.py", "--config", "configs/default.py", "--host_memory=release", f"--flagfile={flagfile}")
  assert out.returncode == 2
  assert "--xla_preset is applied before flags are parsed" in out.stderr and "Traceback" not in out.stderr


def test_predict_help_lists_its_options_and_the_process_flags():
  out = python("predict.py", "--help")
  assert out.returncode == 0, out.stderr[-2000:]
  for option in ("--checkpoint", "--labels", "--xla_preset {cpu,none}", "--host_memory {hugepages,keep,release}",
                 "--cpu_matmul {xla,mkl,openblas}",
                 "--fake_devices N"):
    assert option in out.stdout


def test_argv_value_reads_flags_as_absl_does():
  argv = ["prog", "--xla_preset", "none", "-host_memory=release", "--xla_preset=cpu", "--", "--fake_devices=2"]
  assert command_line._argv_value(argv, "xla_preset") == "cpu"
  assert command_line._argv_value(argv, "host_memory") == "release"
  assert command_line._argv_value(argv, "fake_devices") is None
