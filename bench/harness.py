"""What every benchmark script shares: timing, machine load checks, the environment, tables and JSON.

CPU figures are only meaningful on an otherwise idle machine: a single busy neighbour can slow a
multi-threaded run several-fold (PyTorch's OpenMP pool by up to 10x). ``LoadMonitor`` records the
1-minute load average before and after a measurement, samples how busy the CPUs are just before
it starts, and counts the CPU time that processes other than this one (and its children) used
meanwhile, and the time the hypervisor gave this machine's CPUs to other guests ("steal": the
virtual CPUs did not run). ``trusted`` is False when any of them says the machine was busy, and every script
prints that verdict next to its figures. The load average alone cannot decide it: on virtual
machines it counts tasks that use no CPU (this project's 2-core box sits at 1.0-1.4 with its CPUs
100% idle), and right after a benchmark process it still carries that process's own load.

The scripts run as ``.venv/bin/python bench/NAME.py`` from any directory: ``vit_jax`` and
``configs`` come from the installed package (``make setup`` installs it in editable mode), and
this folder's modules (``harness``, ``workloads``, ...) are imported by their plain names, from
the script's own folder (``bench/parity_full.py`` also needs tests/: see its docstring).
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from vit_jax import host_memory, xla_presets  # neither imports JAX

# Trusted only if: the 1-minute load average before is at most this per core (more runnable
# tasks than cores means contention); the CPUs were at most MAX_BUSY_BEFORE_FRACTION busy in the
# IDLE_PROBE_S seconds before; other processes used at most MAX_FOREIGN_CPU_FRACTION of the
# machine's CPU time during the measurement, and the hypervisor stole at most MAX_STEAL_FRACTION.
MAX_LOAD_BEFORE_PER_CORE = 1.0
MAX_BUSY_BEFORE_FRACTION = 0.05
IDLE_PROBE_S = 2.0
MAX_FOREIGN_CPU_FRACTION = 0.05
MAX_STEAL_FRACTION = 0.05

# XLA flag presets live in the library (vit_jax/xla_presets.py), so train.py and the benchmarks share them.
PRESETS = xla_presets.PRESETS


# Host allocators, selected for every process a script starts (the same for JAX and PyTorch in
# compare_timm). XLA's CPU client allocates a computation's temporaries when it starts and frees
# them when it ends; glibc hands each large block back to the kernel, whose 4 KiB pages are then
# zero-filled again on first touch at every step (vit_jax/host_memory.py).
#   hugepages: what train.py does (vit_jax.host_memory): glibc backs large allocations with
#              transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, glibc >= 2.35).
#   keep:      train.py --host_memory keep: huge pages, and glibc keeps freed memory in the
#              process (no mmap for large blocks, no trimming), so the temporaries stay mapped.
#   glibc:     glibc's defaults.
#   jemalloc:  LD_PRELOAD jemalloc with purging disabled, so freed pages are reused; the price is
#              a resident set that stays at its peak.
# All are set at process start, so ``use_allocator`` re-executes the script.
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2")
ALLOCATORS = ("hugepages", "keep", "glibc", "jemalloc")


def apply_preset(name: str) -> dict[str, Any]:
  """Adds the XLA preset's flags to ``XLA_FLAGS`` (call before importing jax)."""
  flags = xla_presets.apply(name)
  return {"preset": name, "XLA_FLAGS": flags, "allocator": current_allocator()}


def current_allocator() -> str:
  """The allocator this process runs under (see ALLOCATORS)."""
  if "jemalloc" in os.environ.get("LD_PRELOAD", ""):
    return "jemalloc"
  if host_memory.active("keep"):
    return "keep"
  if host_memory.huge_pages_active():
    return "hugepages"
  return "glibc"


def allocator_env(name: str) -> dict[str, str]:
  """Environment variables that select the host allocator ``name`` for a new process."""
  if name not in ALLOCATORS:
    raise ValueError(f"allocator {name!r} is not one of {ALLOCATORS}")
  if name == "glibc":
    return {}
  if name in ("hugepages", "keep"):
    return {"GLIBC_TUNABLES": host_memory.policy_env(name, {})["GLIBC_TUNABLES"]}
  path = next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)
  if path is None:
    raise ValueError(f"--allocator jemalloc: no libjemalloc.so.2 in {', '.join(JEMALLOC_PATHS)}; "
                     "install it (Debian/Ubuntu: apt-get install libjemalloc2) or use --allocator "
                     "hugepages or glibc")
  return {"LD_PRELOAD": path, "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}


def process_env(name: str) -> dict[str, str]:
  """This process's environment with the host allocator ``name`` instead of the current one."""
  others = {"GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF"}
  env = {k: v for k, v in os.environ.items() if k not in others}
  env.update(allocator_env(name))
  return env


def worker_env(allocator: str) -> dict[str, str]:
  """The environment of a benchmark worker process: allocator ``allocator`` and one real CPU
  device, whatever the caller's XLA_FLAGS (tests force 8 fake ones)."""
  env = process_env(allocator)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  return env


def use_allocator(name: str) -> None:
  """Re-executes this script under allocator ``name`` unless it already runs under it."""
  allocator_env(name)  # fails early if it is not installed
  if current_allocator() != name:
    os.execve(sys.executable, [sys.executable] + sys.argv, process_env(name))


def parse_options(items: list[str] | None) -> dict[str, Any]:
  """``["num_layers=2", "classifier='gap'", "scan=True"]`` -> a dict (values as Python literals)."""
  options = {}
  for item in items or []:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"model option {item!r} is not of the form key=value")
    try:
      options[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[key] = value  # a bare string such as classifier=gap
  return options


def load_average() -> tuple[float, float, float]:
  with open("/proc/loadavg") as f:
    one, five, fifteen = f.read().split()[:3]
  return float(one), float(five), float(fifteen)


def _busy_and_steal_seconds() -> tuple[float, float]:
  """CPU seconds since boot that the machine spent busy (user, nice, system, irq, softirq) and that
  the hypervisor stole from it."""
  with open("/proc/stat") as f:
    fields = [int(v) for v in f.readline().split()[1:9]]
  user, nice, system, _idle, _iowait, irq, softirq, steal = fields
  tick = os.sysconf("SC_CLK_TCK")
  return (user + nice + system + irq + softirq) / tick, steal / tick


def _own_seconds() -> float:
  """CPU seconds used by this process and its waited-for children."""
  total = 0.0
  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
    r = resource.getrusage(who)
    total += r.ru_utime + r.ru_stime
  return total


def page_faults_and_system_seconds() -> tuple[int, float]:
  """Page faults (minor and major) this process has taken so far, and its CPU time in the kernel."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_minflt + r.ru_majflt, r.ru_stime


def peak_rss_bytes() -> int:
  """This process's peak resident set (host memory) so far."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def busy_fraction(seconds: float = IDLE_PROBE_S) -> float:
  """How busy the machine's CPUs were over the next ``seconds`` (0 idle, 1 all cores busy)."""
  busy0, t0 = sum(_busy_and_steal_seconds()), time.monotonic()
  time.sleep(seconds)
  return (sum(_busy_and_steal_seconds()) - busy0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))


@dataclasses.dataclass
class LoadMonitor:
  """``with LoadMonitor() as load: ...`` then ``load.report()``: was the machine idle meanwhile?

  ``probe_s`` > 0 first samples how busy the CPUs are for that long (a driver does it once; the
  workers it starts one after another only need the CPU time of other processes).
  """
  probe_s: float = 0.0
  before: tuple[float, float, float] | None = None
  after: tuple[float, float, float] | None = None
  busy_before: float | None = None
  foreign_cpu_fraction: float | None = None
  steal_fraction: float | None = None
  wall_s: float | None = None

  def __enter__(self) -> "LoadMonitor":
    self.before = load_average()
    if self.probe_s > 0:
      self.busy_before = busy_fraction(self.probe_s)
    self._t0, self._own0 = time.monotonic(), _own_seconds()
    self._busy0, self._steal0 = _busy_and_steal_seconds()
    return self

  def __exit__(self, *exc) -> None:
    self.wall_s = time.monotonic() - self._t0
    busy, steal = _busy_and_steal_seconds()
    capacity = self.wall_s * (os.cpu_count() or 1)
    foreign = (busy - self._busy0) - (_own_seconds() - self._own0)
    self.foreign_cpu_fraction = max(0.0, foreign) / capacity
    self.steal_fraction = (steal - self._steal0) / capacity
    self.after = load_average()

  @property
  def clean(self) -> bool:
    """Other processes used (almost) no CPU during the measurement, nor did other guests."""
    return (self.foreign_cpu_fraction <= MAX_FOREIGN_CPU_FRACTION
            and self.steal_fraction <= MAX_STEAL_FRACTION)

  @property
  def idle_before(self) -> bool:
    load_ok = self.before[0] <= MAX_LOAD_BEFORE_PER_CORE * (os.cpu_count() or 1)
    busy_ok = self.busy_before is None or self.busy_before <= MAX_BUSY_BEFORE_FRACTION
    return load_ok and busy_ok

  @property
  def trusted(self) -> bool:
    return self.idle_before and self.clean

  def report(self) -> dict[str, Any]:
    return {"loadavg_before": list(self.before), "loadavg_after": list(self.after),
            "busy_before": None if self.busy_before is None else round(self.busy_before, 4),
            "foreign_cpu_fraction": round(self.foreign_cpu_fraction, 4),
            "steal_fraction": round(self.steal_fraction, 4), "wall_s": round(self.wall_s, 2),
            "clean": self.clean, "trusted": self.trusted}

  def verdict(self) -> str:
    r = self.report()
    text = f"load average before {r['loadavg_before'][0]:.2f}, after {r['loadavg_after'][0]:.2f}; "
    if r["busy_before"] is not None:
      text += f"CPUs {100 * r['busy_before']:.1f}% busy just before; "
    text += (f"other processes used {100 * r['foreign_cpu_fraction']:.1f}% of the CPUs meanwhile and "
             f"the hypervisor stole {100 * r['steal_fraction']:.1f}%")
    if self.trusted:
      return text + ": machine idle, figures trustworthy"
    cores = os.cpu_count() or 1
    return (text + f": MACHINE BUSY, figures NOT trustworthy (want load before <= "
            f"{MAX_LOAD_BEFORE_PER_CORE * cores:.2f}, <= {100 * MAX_BUSY_BEFORE_FRACTION:.0f}% busy "
            f"before, <= {100 * MAX_FOREIGN_CPU_FRACTION:.0f}% foreign CPU and <= "
            f"{100 * MAX_STEAL_FRACTION:.0f}% stolen)")


def report_runs(total: LoadMonitor, runs: Sequence[dict[str, Any]]) -> bool:
  """Prints how many worker runs (each with its ``load`` report) ran undisturbed and the verdict
  over the whole measurement; True if every figure can be trusted."""
  clean = sum(1 for run in runs if run["load"]["clean"])
  print(f"{clean}/{len(runs)} worker runs undisturbed by other processes or guests. {total.verdict()}")
  trusted = total.trusted and clean == len(runs)
  if not trusted:
    print("THESE FIGURES CANNOT BE TRUSTED: re-run on an idle machine.")
  return trusted


def finish_runs(script: str, args: Any, total: LoadMonitor, runs: list[dict[str, Any]],
                **results: Any) -> dict[str, Any]:
  """Reports the verdict over ``runs`` (``report_runs``) and writes the JSON record of a script
  that measured in worker processes: its arguments, ``results``, every run and the environment."""
  trusted = report_runs(total, runs)
  record = {"script": script, "args": vars(args), **results, "runs": runs, "load": total.report(),
            "trusted": trusted, "environment": environment()}
  write_json(args.json, record)
  return record


def time_calls(fn: Callable[[], Any], *, warmup: int = 1, iters: int = 10,
               min_seconds: float = 0.0) -> list[float]:
  """Seconds per call of ``fn`` (which must block until its work is done), after ``warmup`` calls.

  Runs ``iters`` calls, or more until ``min_seconds`` have passed.
  """
  for _ in range(warmup):
    fn()
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < iters or time.perf_counter() - start < min_seconds:
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def summarize(values: Sequence[float]) -> dict[str, float]:
  """Median, min, max, 10th/90th percentiles and spread = (p90 - p10) / median of ``values``."""
  values = sorted(values)
  med = statistics.median(values)
  if len(values) > 1:
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    p10, p90 = deciles[0], deciles[-1]
  else:
    p10 = p90 = values[0]
  return {"median": med, "min": values[0], "max": values[-1], "p10": p10, "p90": p90,
          "n": len(values), "spread": (p90 - p10) / med if med else 0.0}


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def environment(**extra: Any) -> dict[str, Any]:
  """Machine, versions, flags and date, for the JSON record of a run."""
  versions = {"python": platform.python_version()}
  for module in ("jax", "jaxlib", "flax", "optax", "torch", "timm", "tensorflow"):
    if module in sys.modules:
      versions[module] = getattr(sys.modules[module], "__version__", "?")
  env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
         "versions": versions, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  if "jax" in sys.modules:
    jax = sys.modules["jax"]
    env["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
  try:
    env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, check=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  env.update(extra)
  return env


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  """A Markdown table of ``rows`` (floats with 4 significant digits)."""
  def cell(v: Any) -> str:
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
  lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_json(path: str | None, record: dict[str, Any]) -> None:
  """Writes ``record`` to ``path`` (creating folders); prints where."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# Measurements in fresh processes: the script re-runs itself as a worker, which prints one
# result line the driver reads back.

RESULT_PREFIX = "RESULT "


def pin_cores(count: int) -> None:
  """Restricts this process to its first ``count`` allowed cores."""
  cores = sorted(os.sched_getaffinity(0))
  if count > len(cores):
    raise ValueError(f"{count} cores asked for, {len(cores)} available")
  os.sched_setaffinity(0, cores[:count])


def print_result(result: dict[str, Any]) -> None:
  """A worker's result, as the line ``run_worker_process`` reads."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def worker_or_driver(args: Any, is_worker: bool, run_worker: Callable[[Any], dict[str, Any]],
                     run_driver: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
  """A script's main: as a worker (``is_worker``), measure and print the result line the driver
  reads; else drive the fresh worker processes."""
  if is_worker:
    result = run_worker(args)
    print_result(result)
    return result
  return run_driver(args)


def run_worker_process(cmd: Sequence[str], what: str, **kwargs: Any) -> dict[str, Any]:
  """Runs worker ``cmd`` (``subprocess.run`` keyword arguments in ``kwargs``) and returns the
  result it printed; a failure raises with the worker's stderr (``what`` names the worker)."""
  proc = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"worker {what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len(RESULT_PREFIX):])
