"""Runs a sweep's commands here (one after another) or through submitit (SLURM job arrays), resumably.

Under the sweep's root, ``ROOT/<run>`` is each run's workdir (a few-shot run's holds its output),
with the launcher's files beside the run's own:

* ``stdout.log``, ``stderr.log``: the command's output, appended at every attempt;
* ``.sweep_attempts.jsonl``: one line as each attempt starts and one as it ends (exit status,
  wall time);
* ``.sweep_done.json``: written once the command exited 0 and left its completion file
  (``final_metrics.json``, ``few_shot.json``): the command, the device count, and the wall time
  and device-hours of all its attempts (those interrupted or failed too, in any launch whose
  launcher saw them end). A done run is never run again;
* ``.sweep_failed.json``: after the last attempt failed (``1 + retries`` attempts): the exit status
  and the tail of stderr. Later launches report it and do not run it again, unless
  ``retry_failed``; the runs that start from it are skipped.
* ``.sweep_submitted.json``: the SLURM job that was given the run (a later launch does not submit
  a run whose job is still queued or running).

``ROOT/sweep.json`` describes every run of the sweep; ``ROOT/results.jsonl`` and
``ROOT/results.csv`` (``vit_jax.scaling.table``) hold one row per finished or failed run, rebuilt
after every launch and, on SLURM, by each job as it ends. A killed launch resumes: launching the
same sweep again runs what is not done, and a train.py run resumes from its own checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from vit_jax.scaling import table
from vit_jax.scaling.sweep import REPO, Resolved

EXECUTORS = ("local", "submitit-local", "slurm")
DONE, FAILED, ATTEMPTS, SUBMITTED = (".sweep_done.json", ".sweep_failed.json",
                                     ".sweep_attempts.jsonl", ".sweep_submitted.json")
STDOUT, STDERR = "stdout.log", "stderr.log"
PLAN = "sweep.json"
TAIL_LINES = 30
ACTIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING",
                       "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT")


@dataclasses.dataclass(frozen=True)
class Job:
  """What it takes to run one run anywhere (pickled into a submitit job)."""
  name: str
  root: str
  argv: tuple[str, ...]            # after the Python executable, run in the repository
  marker: str                      # the completion file, relative to ROOT/<name>
  parents: tuple[str, ...] = ()
  retries: int = 1
  devices: int = 1

  @property
  def workdir(self) -> str:
    return os.path.join(self.root, self.name)

  def command(self) -> list[str]:
    return [sys.executable, *self.argv]


@dataclasses.dataclass(frozen=True)
class Slurm:
  """SLURM resources of each run (submitit's ``slurm_*`` parameters)."""
  partition: str | None = None
  nodes: int = 1
  gpus_per_node: int = 0
  tasks_per_node: int | None = None    # None: one per GPU (train.py: one process per GPU)
  cpus_per_task: int | None = None
  mem_gb: float | None = None
  time_min: int = 24 * 60
  account: str | None = None
  qos: str | None = None
  constraint: str | None = None
  array_parallelism: int = 256
  setup: tuple[str, ...] = ()          # shell lines run before each job (modules, venv)

  @property
  def devices(self) -> int:
    return max(1, self.nodes * self.gpus_per_node)

  def parameters(self) -> dict[str, Any]:
    """The AutoExecutor parameters."""
    tasks = self.tasks_per_node or max(1, self.gpus_per_node)
    params = {"slurm_partition": self.partition, "nodes": self.nodes, "tasks_per_node": tasks,
              "gpus_per_node": self.gpus_per_node or None, "cpus_per_task": self.cpus_per_task,
              "mem_gb": self.mem_gb, "timeout_min": self.time_min,
              "slurm_account": self.account, "slurm_qos": self.qos,
              "slurm_constraint": self.constraint,
              "slurm_array_parallelism": self.array_parallelism,
              # The jobs unpickle this library's classes wherever sbatch starts them.
              "slurm_setup": [f"export PYTHONPATH={shlex.quote(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}",
                              *self.setup]}
    return {k: v for k, v in params.items() if v is not None}


# --- One run -----------------------------------------------------------------------------------

def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, data: Mapping[str, Any]) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2)
  os.replace(tmp, path)


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def attempts(workdir: str) -> list[dict]:
  """The attempt records of a run (``.sweep_attempts.jsonl``)."""
  try:
    with open(os.path.join(workdir, ATTEMPTS)) as f:
      return [json.loads(line) for line in f if line.strip().endswith("}")]
  except OSError:
    return []


def _record(workdir: str, **entry: Any) -> None:
  with open(os.path.join(workdir, ATTEMPTS), "a") as f:
    f.write(json.dumps({"time": _now(), **entry}) + "\n")


def is_done(job: Job) -> bool:
  """Finished: the launcher's done file, or the command's completion file (a run that finished
  while its launcher was killed gets its done file now)."""
  if os.path.exists(os.path.join(job.workdir, DONE)):
    return True
  if os.path.exists(os.path.join(job.workdir, job.marker)):
    ends = [a for a in attempts(job.workdir) if a.get("event") == "end"]
    wall = sum(a.get("wall_s", 0.0) for a in ends) or None
    _write_json(os.path.join(job.workdir, DONE), {
        "argv": list(job.argv), "finished": _now(), "wall_s": wall, "devices": job.devices,
        "device_hours": None if wall is None else wall * job.devices / 3600,
        "attempts": len(ends), "note": "completed outside a launch that saw it finish"})
    return True
  return False


def failure(job: Job) -> dict | None:
  """The run's failure record, if its last launch gave up on it."""
  return _read_json(os.path.join(job.workdir, FAILED))


def _tail(path: str, offset: int) -> str:
  try:
    with open(path, "rb") as f:
      f.seek(offset)
      text = f.read().decode("utf-8", "replace")
  except OSError:
    return ""
  lines = [l for l in text.replace("\r", "\n").splitlines() if l.strip()]
  return "\n".join(lines[-TAIL_LINES:])


def error_line(tail: str) -> str:
  """The line of a stderr tail that says what went wrong (train.py's ``error: ...``, else the
  last line)."""
  lines = tail.splitlines()
  for line in reversed(lines):
    if re.match(r"\s*(error:|\w*(Error|Exception)\b)", line):
      return line.strip()
  return lines[-1].strip() if lines else "(no output on stderr)"


class Interrupted(Exception):
  """The launcher was asked to stop (SIGTERM)."""


def execute(job: Job, *, env: Mapping[str, str] | None = None, rank: int = 0,
            say: Callable[[str], None] = print) -> str:
  """Runs ``job`` (up to 1 + retries attempts) unless it is done; returns "done", "failed" or
  "interrupted" (it exited 0 without its completion file: train.py preempted).

  On SIGINT / ``Interrupted`` the command gets SIGTERM (train.py then saves a checkpoint), is
  waited for, and the exception goes on. ``rank``: the process of a multi-process job; only
  process 0 keeps the records (the others log to ``stdout.<rank>.log`` and ``stderr.<rank>.log``).
  """
  if is_done(job):
    return "done"
  os.makedirs(job.workdir, exist_ok=True)
  markers = rank == 0
  record = _record if markers else (lambda *a, **k: None)
  suffix = "" if markers else f".{rank}"
  total_wall, tail, rc = 0.0, "", 0
  for attempt in range(1, job.retries + 2):
    err_path = os.path.join(job.workdir, STDERR.replace(".log", suffix + ".log"))
    out_path = os.path.join(job.workdir, STDOUT.replace(".log", suffix + ".log"))
    offset = os.path.getsize(err_path) if os.path.exists(err_path) else 0
    record(job.workdir, event="start", attempt=attempt, argv=list(job.argv))
    start = time.time()
    with open(out_path, "ab") as out, open(err_path, "ab") as err:
      proc = subprocess.Popen(job.command(), cwd=REPO, stdout=out, stderr=err,
                              env=None if env is None else dict(env))
      try:
        rc = proc.wait()
      except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
          proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
        record(job.workdir, event="end", attempt=attempt, rc="interrupted",
               wall_s=round(time.time() - start, 1))
        raise
    wall = time.time() - start
    total_wall += wall
    record(job.workdir, event="end", attempt=attempt, rc=rc, wall_s=round(wall, 1))
    if rc == 0:
      if not os.path.exists(os.path.join(job.workdir, job.marker)):
        return "interrupted"
      if markers:
        ends = [a for a in attempts(job.workdir) if a.get("event") == "end"]
        wall_all = sum(a["wall_s"] for a in ends)  # interrupted and failed attempts included
        _write_json(os.path.join(job.workdir, DONE), {
            "argv": list(job.argv), "finished": _now(), "wall_s": round(wall_all, 1),
            "devices": job.devices, "device_hours": wall_all * job.devices / 3600,
            "attempts": len(ends), "last_attempt_wall_s": round(wall, 1)})
        if os.path.exists(os.path.join(job.workdir, FAILED)):
          os.remove(os.path.join(job.workdir, FAILED))
      return "done"
    tail = _tail(err_path, offset)
    if attempt <= job.retries:
      say(f"  {job.name}: attempt {attempt} failed (exit {rc}): {error_line(tail)}; retrying")
  if markers:
    _write_json(os.path.join(job.workdir, FAILED), {
        "argv": list(job.argv), "failed": _now(), "returncode": rc, "attempts": job.retries + 1,
        "wall_s": round(total_wall, 1), "devices": job.devices,
        "device_hours": total_wall * job.devices / 3600, "stderr_tail": tail})
  return "failed"


def blocked_by(job: Job) -> str | None:
  """The first parent of ``job`` that is not done (so the run cannot start), or None."""
  for parent in job.parents:
    if not os.path.exists(os.path.join(job.root, parent, DONE)):
      return parent
  return None


# --- The sweep ----------------------------------------------------------------------------------

def jobs_of(plan: Sequence[Resolved], root: str, retries: int = 1, devices: int = 1
            ) -> dict[str, Job]:
  root = os.path.abspath(root)
  return {r.run.name: Job(r.run.name, root, tuple(r.argv), r.marker,
                          (r.run.parent,) if r.run.parent else (), retries, devices)
          for r in plan}


def levels(jobs: Sequence[Job]) -> list[list[Job]]:
  """``jobs`` by depth: the first list starts from nothing among them, the next from the first."""
  depth: dict[str, int] = {}
  for job in jobs:
    depth[job.name] = 1 + max((depth.get(p, -1) for p in job.parents), default=-1)
  deepest = max(depth.values(), default=-1)
  return [[j for j in jobs if depth[j.name] == d] for d in range(deepest + 1)]


def write_plan(plan: Sequence[Resolved], root: str, sweep_spec: str) -> None:
  """``ROOT/sweep.json``: every run's command and description, read back by ``collect``."""
  os.makedirs(root, exist_ok=True)
  _write_json(os.path.join(root, PLAN), {"sweep": sweep_spec, "written": _now(),
                                         "runs": [r.to_json() for r in plan]})


def read_plan(root: str) -> list[dict]:
  data = _read_json(os.path.join(root, PLAN))
  if data is None:
    raise ValueError(f"{root} holds no {PLAN}: it is not a sweep's root")
  return data["runs"]


def _metrics(run: Mapping[str, Any], workdir: str) -> dict[str, float]:
  found = _read_json(os.path.join(workdir, run["marker"])) or {}
  out = {k: v for k, v in found.items() if k.startswith("fewshot/") and table.is_number(v)}
  top1 = found.get("top1")
  if table.is_number(top1) and run["stage"] == "pretrain":
    out["eval/top1"] = top1
  elif table.is_number(top1) and run["stage"] == "finetune":
    out[f"transfer/{run['dataset']}/top1"] = top1
  return out


def collect(root: str) -> list[dict]:
  """One row per finished or failed run of the sweep in ``root`` (``vit_jax.scaling.table``).

  A fine-tuning or few-shot row has its pre-training run's model, family, params, data_size and
  train_flops, and its own steps, batch_size and examples_seen (none for few-shot) and
  device_hours. Metrics: ``top1`` of final_metrics.json as ``eval/top1`` (pre-training) or
  ``transfer/<dataset>/top1`` (fine-tuning), and every ``fewshot/<dataset>/<k>shot`` of the run's
  completion file (few_shot.py's output, or a training run's few-shot evaluation).
  """
  rows = []
  for run in read_plan(root):
    workdir = os.path.join(root, run["name"])
    done = _read_json(os.path.join(workdir, DONE))
    failed = _read_json(os.path.join(workdir, FAILED))
    record = done or failed
    if record is None:
      continue
    rows.append({
        "run": run["name"], "stage": run["stage"], "parent": run["parent"] or "",
        "model": run.get("label") or run["model"], "family": run["family"], "params": run["params"],
        "data_size": run["data_size"], "steps": run["steps"], "batch_size": run["batch_size"],
        "examples_seen": run["examples_seen"], "train_flops": run["pretrain_flops"],
        "device_hours": record.get("device_hours"), "status": "done" if done else "failed",
        "seed": run["seed"], **(_metrics(run, workdir) if done else {})})
  return rows


def write_results(root: str) -> list[str]:
  """Rebuilds ``ROOT/results.jsonl`` and ``ROOT/results.csv`` from the runs' files (under a lock,
  so that jobs ending together leave the table of all of them)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  with open(os.path.join(root, ".results.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    return [str(p) for p in table.write_table(collect(root), root)]


@dataclasses.dataclass
class Outcome:
  """What a launch did: run name -> status, and why for those not done."""
  status: dict[str, str] = dataclasses.field(default_factory=dict)
  why: dict[str, str] = dataclasses.field(default_factory=dict)
  ran: list[str] = dataclasses.field(default_factory=list)
  changed: list[str] = dataclasses.field(default_factory=list)  # done with another command

  def set(self, name: str, status: str, why: str = "") -> None:
    self.status[name] = status
    if why:
      self.why[name] = why

  def count(self, status: str) -> int:
    return sum(1 for s in self.status.values() if s == status)

  @property
  def ok(self) -> bool:
    return all(s in ("done", "submitted", "queued") for s in self.status.values())


def _failure_why(job: Job, record: Mapping[str, Any]) -> str:
  return (f"{error_line(record.get('stderr_tail', ''))} (exit {record.get('returncode')}, "
          f"{record.get('attempts')} attempt(s); {os.path.join(job.workdir, FAILED)})")


def _triage(job: Job, outcome: Outcome, retry_failed: bool) -> bool:
  """Whether ``job`` is to run; otherwise its status is set (done, failed earlier, skipped)."""
  if is_done(job):
    outcome.set(job.name, "done")
    argv = (_read_json(os.path.join(job.workdir, DONE)) or {}).get("argv")
    if argv is not None and argv != list(job.argv):
      outcome.changed.append(job.name)
    return False
  record = failure(job)
  if record is not None and not retry_failed:
    outcome.set(job.name, "failed", "failed in an earlier launch, not retried (--retry_failed "
                f"runs it again): {_failure_why(job, record)}")
    return False
  for parent in job.parents:
    if outcome.status.get(parent) not in (None, "done", "submitted", "queued"):
      outcome.set(job.name, "skipped", f"its parent {parent} is {outcome.status[parent]}")
      return False
  if record is not None:
    os.remove(os.path.join(job.workdir, FAILED))
  return True


def run_local(jobs: Sequence[Job], *, retry_failed: bool = False,
              env: Mapping[str, str] | None = None, say: Callable[[str], None] = print) -> Outcome:
  """Runs ``jobs`` here, one after another, in their order (each after its parents)."""
  outcome = Outcome()
  for i, job in enumerate(jobs, 1):
    prefix = f"[{i}/{len(jobs)}] {job.name}"
    if not _triage(job, outcome, retry_failed):
      status = outcome.status[job.name]
      say(f"{prefix}: {'already done' if status == 'done' else status}")
      continue
    say(f"{prefix}: running ({shlex.join(job.argv[:2])} ...; log {job.workdir}/{STDOUT})")
    start = time.time()
    status = execute(job, env=env, say=say)
    outcome.ran.append(job.name)
    if status == "failed":
      outcome.set(job.name, "failed", _failure_why(job, failure(job) or {}))
    elif status == "interrupted":
      outcome.set(job.name, "interrupted", "it stopped before finishing (preempted?); launch "
                  "again to resume it")
    else:
      outcome.set(job.name, "done")
    say(f"{prefix}: {status} in {time.time() - start:.1f} s" +
        (f": {outcome.why[job.name]}" if job.name in outcome.why else ""))
  return outcome


# --- submitit ------------------------------------------------------------------------------------

def _rank() -> int:
  try:
    import submitit  # pylint: disable=g-import-not-at-top
    return submitit.JobEnvironment().global_rank
  except (ImportError, RuntimeError, KeyError, ValueError):
    return 0


try:
  import submitit as _submitit
  _Checkpointable = _submitit.helpers.Checkpointable
except ImportError:  # submitit is needed only to submit
  _Checkpointable = object


class RunJob(_Checkpointable):
  """The function a submitit job runs: one run (as ``execute``), if its parents are done. On a
  timeout or preemption submitit requeues it with the same job, and train.py resumes."""

  def __call__(self, job: Job) -> str:
    rank = _rank()
    parent = blocked_by(job)
    if parent is not None:
      return f"skipped: its parent {parent} is not done"
    status = execute(job, rank=rank)
    if rank == 0:
      write_results(job.root)
    return status


def _executor(kind: str, folder: str, slurm: Slurm, name: str) -> Any:
  import submitit  # pylint: disable=g-import-not-at-top
  cluster = "slurm" if kind == "slurm" else "local"
  executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
  if kind == "slurm":
    params = slurm.parameters()
  else:  # submitit hides the GPUs from a local job that asks for none
    params = {"timeout_min": slurm.time_min, "gpus_per_node": slurm.gpus_per_node or None}
    params = {k: v for k, v in params.items() if v is not None}
  executor.update_parameters(name=name, **params)
  return executor


def _slurm_active(job_id: str) -> bool:
  try:
    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True,
                         text=True, timeout=60, check=False).stdout
  except (OSError, subprocess.TimeoutExpired):
    return False
  return any(s.strip() in ACTIVE_SLURM_STATES for s in out.splitlines())


def run_submitit(jobs: Sequence[Job], kind: str, *, slurm: Slurm, name: str = "sweep",
                 retry_failed: bool = False, wait: bool = False,
                 say: Callable[[str], None] = print) -> Outcome:
  """``kind`` "submitit-local": each level of ``jobs`` as a job array of submitit's
  LocalExecutor on this machine, waiting for one level before the next. "slurm": every level
  submitted at once as a job array, each starting after the previous one ended
  (``--dependency=afterany``; a run whose parent failed is skipped by its job); returns at once
  unless ``wait``."""
  outcome = Outcome()
  todo, queued = [], {}
  for job in jobs:
    if not _triage(job, outcome, retry_failed):
      continue
    submitted = _read_json(os.path.join(job.workdir, SUBMITTED))
    if kind == "slurm" and submitted and _slurm_active(submitted["job_id"]):
      outcome.set(job.name, "queued", f"SLURM job {submitted['job_id']} is queued or running")
      queued[job.name] = submitted["job_id"]
      continue
    todo.append(job)
  folder = os.path.join(jobs[0].root if jobs else ".", ".submitit")
  previous: list[str] = []
  waiting = []
  for depth, level in enumerate(levels(todo)):
    executor = _executor(kind, folder, slurm, f"{name}-{depth}")
    after = previous + sorted({queued[p] for j in level for p in j.parents if p in queued})
    if kind == "slurm" and after:
      executor.update_parameters(slurm_dependency="afterany:" + ":".join(after))
    for job in level:
      os.makedirs(job.workdir, exist_ok=True)
    submitted_jobs = executor.map_array(RunJob(), level)
    array_id = submitted_jobs[0].job_id.split("_")[0]
    say(f"level {depth}: {len(level)} run(s) submitted as {kind} job array {array_id}")
    for job, sub in zip(level, submitted_jobs):
      _write_json(os.path.join(job.workdir, SUBMITTED), {"job_id": sub.job_id, "time": _now(),
                                                         "executor": kind})
      outcome.set(job.name, "submitted", f"job {sub.job_id}")
      outcome.ran.append(job.name)
    if kind == "slurm":  # the next level waits in SLURM's queue
      previous = [array_id]
      waiting += list(zip(level, submitted_jobs)) if wait else []
    else:
      _wait(list(zip(level, submitted_jobs)), outcome, say)
  _wait(waiting, outcome, say)
  return outcome


def _wait(pairs: Sequence[tuple[Job, Any]], outcome: Outcome, say: Callable[[str], None]) -> None:
  for job, sub in pairs:
    try:
      result = str(sub.result())
    except Exception as e:  # pylint: disable=broad-except  (the job itself died)
      result = f"failed: the submitit job died: {str(e).strip().splitlines()[-1:]}"
    if result == "done":
      outcome.set(job.name, "done")
    elif result.startswith("skipped"):
      outcome.set(job.name, "skipped", result.partition(": ")[2])
    elif result == "interrupted":
      outcome.set(job.name, "interrupted", "it stopped before finishing; launch again to resume")
    else:
      record = failure(job)
      outcome.set(job.name, "failed", _failure_why(job, record) if record else result)
    say(f"{job.name}: {outcome.status[job.name]}")


# --- Entry point ----------------------------------------------------------------------------------

def launch(plan: Sequence[Resolved], root: str, *, only: Sequence[str] | None = None,
           sweep_spec: str = "", executor: str = "local", retries: int = 1,
           retry_failed: bool = False, devices: int | None = None, slurm: Slurm | None = None,
           wait: bool = False, env: Mapping[str, str] | None = None,
           say: Callable[[str], None] = print) -> int:
  """Runs (or submits) the runs of ``plan`` (``sweep.resolve`` of a whole sweep) that are not
  done, or of those named in ``only`` (with their parents); returns the exit status (0: every one
  of them done, submitted or queued). The results table covers every run of the plan."""
  if executor not in EXECUTORS:
    raise ValueError(f"executor {executor!r} is not one of {list(EXECUTORS)}")
  if retries < 0:
    raise ValueError(f"--retries {retries} is negative")
  root = os.path.abspath(root)
  slurm = slurm or Slurm()
  if devices is None:
    devices = slurm.devices if executor == "slurm" else 1
  with _only_launch(root):
    write_plan(plan, root, sweep_spec)
    jobs = list(jobs_of(plan, root, retries, devices).values())
    if only is not None:
      wanted = set(only)
      for job in reversed(jobs):
        if job.name in wanted:
          wanted.update(job.parents)
      jobs = [j for j in jobs if j.name in wanted]
    try:
      if executor == "local":
        with _sigterm_interrupts():
          outcome = run_local(jobs, retry_failed=retry_failed, env=env, say=say)
      else:
        name = "sweep-" + os.path.basename(sweep_spec.partition(":")[0]).removesuffix(".py")
        outcome = run_submitit(jobs, executor, slurm=slurm, retry_failed=retry_failed,
                               wait=wait, name=name, say=say)
    except (KeyboardInterrupt, Interrupted):
      say("interrupted: the run in progress was stopped (train.py saves a checkpoint); launch "
          "the same command again to resume")
      write_results(root)
      return 130
    paths = write_results(root)
  say(summary(outcome, jobs))
  say(f"results: {', '.join(paths)}")
  if executor == "slurm" and not wait and outcome.count("submitted"):
    say("launch the same command again to see what finished (it submits only what is neither "
        "done nor queued); each job also updates the results as it ends")
  return 0 if outcome.ok else 1


@contextlib.contextmanager
def _only_launch(root: str) -> Iterator[None]:
  """Holds ``ROOT/.sweep.lock``: a second launch in the same root is refused."""
  import fcntl  # pylint: disable=g-import-not-at-top
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, ".sweep.lock"), "w") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise ValueError(f"another launch of a sweep in {root} is running") from None
    yield


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
  """SIGTERM raises ``Interrupted`` (so the run in progress is stopped cleanly, as on Ctrl-C)."""
  def interrupt(signum, frame):  # pylint: disable=unused-argument
    raise Interrupted()
  previous = signal.signal(signal.SIGTERM, interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def summary(outcome: Outcome, jobs: Sequence[Job]) -> str:
  counts = [f"{outcome.count(s)} {s}" for s in ("done", "submitted", "queued", "failed",
                                                 "skipped", "interrupted") if outcome.count(s)]
  ran = len(outcome.ran)
  lines = [f"summary: {len(jobs)} runs: {', '.join(counts)} ({ran} started by this launch)"]
  for status in ("failed", "skipped", "interrupted"):
    names = [j.name for j in jobs if outcome.status.get(j.name) == status]
    if names:
      lines.append(f"{status}:")
      lines += [f"  {n}: {outcome.why.get(n, '')}" for n in names]
  if outcome.changed:
    lines.append(f"note: {len(outcome.changed)} done run(s) ran with another command than the "
                 "sweep gives now; their results are kept (delete ROOT/<run> to run one again): "
                 + ", ".join(outcome.changed))
  return "\n".join(lines)
