"""Fault injection: a small run, faults at random moments, every end compared with an uninterrupted run.

  .venv/bin/python bench/faults.py --trials 20 --sigterm 10 --json results/faults.json

Trains configs/default.py shrunk (a 2-layer width-32 ViT on the digits, 40 steps of 64 images, a
checkpoint every 5 steps, evaluation at steps 20 and 40, one CPU device) once without faults,
then, each trial in a fresh workdir:

  sigkill   SIGKILL at a moment drawn uniformly over the uninterrupted run's wall time (so over
            start-up, steps, asynchronous checkpoint writes and evaluation alike), then the same
            command again until it ends;
  sigterm   SIGTERM likewise: the run finishes its step, saves and exits 0 (a SIGTERM during
            start-up, before the handler is installed, kills it), then the same command again;
  corrupt   a run SIGKILLed at a random step once it has two checkpoints, whose latest is then
            damaged by each of tests/checkpoint_damage.py's variants in turn (flipped or missing bytes,
            truncated and deleted data files, garbled metadata, stale arrays, a wrong
            fingerprint); the restart must name it as damaged and resume from the one before;
  double    a second train.py on the workdir of a run in progress must be refused, naming it.

Every trial must end with a final train state (the checkpoint of the last step) bit-equal to the
uninterrupted run's. Recorded per trial: the moment of the fault, the last step logged before
it, whether an asynchronous checkpoint write was in flight (a step directory still temporary),
the outcome. Not injected here: a full disk and a dead peer of a two-process run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the damage helpers and the checkpoint reader live in tests/

STEPS = 40
TINY = ["--config.model.hidden_size=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.batch_size=64", f"--config.total_steps={STEPS}",
        "--config.log_every=1", "--config.checkpoint_every=5", "--config.eval_every=20",
        "--config.schedule.warmup_steps=5", "--config.model.dropout_rate=0.1",
        "--config.keep_checkpoints=3"]


def env() -> dict:
  e = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  e["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # tiny programs: compiling dominates
  return e


def command(workdir: str, *, skip_space_check: bool = False) -> list[str]:
  train = [os.path.join(ROOT, "train.py")]
  if skip_space_check:  # the disk fills between the check before a save and the write
    train = ["-c", "import runpy, shutil, sys; "
             "shutil.disk_usage = lambda p: shutil._ntuple_diskusage(1 << 50, 0, 1 << 50); "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')", train[0]]
  return [sys.executable, *train, "--config", os.path.join(ROOT, "configs/default.py"),
          "--workdir", workdir, *TINY]


def run(workdir: str, timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir), env=env(), cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def last_logged_step(workdir: str) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  return max((json.loads(l)["step"] for l in open(path).read().splitlines() if l.strip()), default=0)


def checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def write_in_flight(workdir: str) -> bool:
  """Whether orbax was writing a step (its temporary directory exists)."""
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any("tmp" in x for x in os.listdir(d))


def final_state(workdir: str) -> dict:
  from tests.checkpoint_reading import read_state
  return read_state(workdir, STEPS)


def same_state(a: dict, b: dict) -> bool:
  import numpy as np
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def interrupt(workdir: str, sig: int, at_s: float) -> dict:
  """Starts the run, sends ``sig`` after ``at_s`` seconds (or lets it end first); what it saw."""
  proc = subprocess.Popen(command(workdir), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  start = time.time()
  while proc.poll() is None and time.time() - start < at_s:
    time.sleep(0.01)
  seen = {"at_s": round(time.time() - start, 2), "step_before": last_logged_step(workdir),
          "write_in_flight": write_in_flight(workdir), "ended_first": proc.poll() is not None}
  if proc.poll() is None:
    proc.send_signal(sig)
  _, err = proc.communicate(timeout=600)
  seen["returncode"] = proc.returncode
  seen["stderr_tail"] = err[-300:]
  return seen


def kill_after(workdir: str, step: int) -> dict:
  """Starts the run and SIGKILLs it once it has logged ``step`` and kept two complete
  checkpoints (a run with something to fall back to)."""
  proc = subprocess.Popen(command(workdir), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  start, deadline = time.time(), time.time() + 600
  while ((last_logged_step(workdir) < step or len(checkpoint_steps(workdir)) < 2)
         and proc.poll() is None and time.time() < deadline):
    time.sleep(0.01)
  seen = {"at_s": round(time.time() - start, 2), "step_before": last_logged_step(workdir)}
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return seen


def finish(workdir: str, reference: dict, trial: dict) -> dict:
  out = run(workdir)
  trial["restart_returncode"] = out.returncode
  trial["restart_said"] = [l for l in out.stderr.splitlines() if "damaged" in l or "error" in l][:3]
  trial["bit_equal"] = out.returncode == 0 and same_state(final_state(workdir), reference)
  return trial


def trial_signal(root: str, name: str, sig: int, duration: float, reference: dict,
                 rng: random.Random) -> dict:
  workdir = os.path.join(root, name)
  trial = {"trial": name, "fault": signal.Signals(sig).name,
           **interrupt(workdir, sig, rng.uniform(0.0, duration))}
  return finish(workdir, reference, trial)


def trial_corrupt(root: str, duration: float, reference: dict, rng: random.Random,
                  variants: list[str]) -> list[dict]:
  """One SIGKILL run with two or more checkpoints, copied once per damage variant."""
  from tests.checkpoint_damage import corrupt
  base = os.path.join(root, "corrupt-base")
  del duration
  seen = kill_after(base, rng.randint(12, STEPS - 6))
  if len(checkpoint_steps(base)) < 2 or checkpoint_steps(base)[-1] >= STEPS:
    raise RuntimeError(f"the SIGKILL left checkpoints {checkpoint_steps(base)}: two before the end "
                       "are needed")
  out = []
  for how in variants:
    workdir = os.path.join(root, f"corrupt-{how}")
    shutil.copytree(base, workdir)
    latest = checkpoint_steps(workdir)[-1]
    corrupt(os.path.join(workdir, "checkpoints", str(latest)), how)
    trial = finish(workdir, reference, {"trial": f"corrupt-{how}", "fault": f"damaged step {latest} ({how})",
                                        "at_s": seen["at_s"], "step_before": seen["step_before"]})
    trial["named_as_damaged"] = any(f"/{latest} is damaged" in l for l in trial["restart_said"])
    trial["ok"] = trial["bit_equal"] and trial["named_as_damaged"]
    out.append(trial)
  return out


def trial_double(root: str, reference: dict) -> dict:
  workdir = os.path.join(root, "double")
  first = subprocess.Popen(command(workdir), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while last_logged_step(workdir) < 1 and first.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  second = run(workdir)
  first.wait(timeout=600)
  trial = {"trial": "double", "fault": "second train.py on a workdir in use",
           "second_returncode": second.returncode,
           "second_said": (second.stderr.strip().splitlines() or [""])[-1][:300],
           "bit_equal": first.returncode == 0 and same_state(final_state(workdir), reference)}
  trial["ok"] = (trial["bit_equal"] and second.returncode != 0
                 and f"(process {first.pid} on " in second.stderr and "Traceback" not in second.stderr)
  return trial


def _free(path: str) -> int:
  st = os.statvfs(path)
  return st.f_bavail * st.f_frsize


def fill(mount: str, leave: int) -> None:
  """Writes a filler file until ``leave`` bytes remain free."""
  with open(os.path.join(mount, "filler"), "ab") as f:
    try:
      f.write(b"\0" * max(0, _free(mount) - leave))
    except OSError:
      pass


def trial_full_disk(root: str, reference: dict, how: str) -> dict:
  """A run on its own size-limited filesystem (a tmpfs, mounted here), filled up while it trains:
  ``before``: after its first checkpoint, leaving 256 KB (less than a checkpoint); ``during``:
  the moment orbax's temporary directory of a save appears, leaving nothing. The run must stop
  with one clear message, its previous checkpoint intact; with the space freed, the same command
  must end bit-equal to the uninterrupted run."""
  mount = os.path.join(root, f"full-{how}")
  os.makedirs(mount)
  trial = {"trial": f"full-disk-{how}", "fault": "disk filled " + {
      "before": "after the first checkpoint", "during": "while a checkpoint is written",
      "unchecked": "after the first checkpoint, the check before saving skipped"}[how]}
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mount],
                           capture_output=True, text=True)
  if mounted.returncode != 0:
    return {**trial, "ok": False, "not_run": f"cannot mount a tmpfs here: {mounted.stderr.strip()}"}
  try:
    workdir = os.path.join(mount, "run")
    proc = subprocess.Popen(command(workdir, skip_space_check=how == "unchecked"), env=env(),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start, deadline = time.time(), time.time() + 600
    ready = ((lambda: checkpoint_steps(workdir)) if how != "during" else
             (lambda: checkpoint_steps(workdir) and write_in_flight(workdir)))
    while not ready() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.002)
    trial.update(at_s=round(time.time() - start, 2), step_before=last_logged_step(workdir),
                 write_in_flight=write_in_flight(workdir), checkpoints_before=checkpoint_steps(workdir))
    fill(mount, 0 if how == "during" else 256 * 1024)
    _, err = proc.communicate(timeout=600)
    lines = [l for l in err.splitlines() if l.strip()]
    trial["stderr_head"] = [l[:160] for l in lines if "port.cc" not in l and "absl::InitializeLog" not in l][:12]
    trial.update(returncode=proc.returncode, said=(lines or [""])[-1][:400],
                 traceback="Traceback" in err, stderr_lines=len(lines))
    os.remove(os.path.join(mount, "filler"))
    trial = finish(workdir, reference, trial)
    trial["ok"] = (trial["bit_equal"] and proc.returncode == 1 and not trial["traceback"]
                   and trial["said"].startswith("error: ") and "no space" in trial["said"]
                   and "is intact" in trial["said"])
    return trial
  finally:
    subprocess.run(["umount", mount], capture_output=True)


PEER_TIMEOUT = 10


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def trial_dead_peer(root: str, victim: int, sig: int = signal.SIGKILL) -> dict:
  """A two-process run (one CPU device each, explicit start on localhost, --peer_timeout=10),
  process ``victim`` SIGKILLed (or SIGSTOPped: a hung process) after a few steps: the survivor
  must exit 1 within half the peer timeout (plus slack) with one line naming what happened, and
  the same two commands again must resume from the last checkpoint and finish."""
  how = "killed" if sig == signal.SIGKILL else "stopped"
  workdir = os.path.join(root, f"dead-peer-{victim}-{how}")

  def start(i: int, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        command(workdir) + ["--distributed=explicit", f"--coordinator_address=localhost:{port}",
                            "--num_processes=2", f"--process_id={i}", f"--peer_timeout={PEER_TIMEOUT}",
                            "--config.total_steps=200", "--config.eval_every=200",
                            "--config.checkpoint_every=10"],
        env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  port = _free_port()
  procs = [start(i, port) for i in range(2)]
  deadline = time.time() + 300
  while ((last_logged_step(workdir) < 12 or not checkpoint_steps(workdir))
         and all(p.poll() is None for p in procs) and time.time() < deadline):
    time.sleep(0.05)
  trial = {"trial": f"peer-{victim}-{how}",
           "fault": f"process {victim} of 2 {signal.Signals(sig).name}ed",
           "step_before": last_logged_step(workdir)}
  procs[victim].send_signal(sig)
  killed = time.time()
  survivor = procs[1 - victim]
  _, err = survivor.communicate(timeout=300)
  procs[victim].kill()
  procs[victim].communicate()
  lines = [l for l in err.splitlines() if l.strip() and "port.cc" not in l and "InitializeLog" not in l]
  trial.update(survivor_exit_s=round(time.time() - killed, 1), survivor_returncode=survivor.returncode,
               said=(lines or [""])[-1][:300], traceback="Traceback" in err)
  port = _free_port()
  again = [start(i, port) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in again]
  trial["restart_returncodes"] = [p.returncode for p in again]
  trial["resumed"] = [l for l in outs[0].splitlines() if "resumed from step" in l][:1]
  trial["ok"] = (survivor.returncode == 1 and trial["survivor_exit_s"] < PEER_TIMEOUT / 2 + 10
                 and trial["said"].startswith("error: ") and not trial["traceback"]
                 and trial["restart_returncodes"] == [0, 0] and bool(trial["resumed"])
                 and last_logged_step(workdir) == 200)
  return trial


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--trials", type=int, default=20, help="SIGKILL trials")
  p.add_argument("--sigterm", type=int, default=10, help="SIGTERM trials")
  p.add_argument("--damage", default="all",
                 help="damage variants for the corrupt trials, comma-separated, 'all' or 'none' "
                      "(tests/checkpoint_damage.py)")
  p.add_argument("--no-double", action="store_true", help="skip the double-run trial")
  p.add_argument("--full-disk", default="before,during,unchecked",
                 help="full-disk trials, comma-separated: before, during, unchecked, or none")
  p.add_argument("--dead-peer", default="1,0,1s",
                 help="dead-peer trials: which process of two to SIGKILL (N) or SIGSTOP (Ns), "
                      "comma-separated, or none")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None)
  p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary dir)")
  args = p.parse_args(argv)
  rng = random.Random(args.seed)
  root = args.workdir or tempfile.mkdtemp(prefix="vit_jax_faults_")
  t = time.time()
  out = run(os.path.join(root, "reference"))
  if out.returncode != 0:
    raise RuntimeError(f"the uninterrupted run failed:\n{out.stderr[-2000:]}")
  duration = time.time() - t
  reference = final_state(os.path.join(root, "reference"))
  print(f"uninterrupted run: {duration:.1f} s", flush=True)
  trials = []
  for i in range(args.trials):
    trials.append(trial_signal(root, f"sigkill-{i}", signal.SIGKILL, duration, reference, rng))
  for i in range(args.sigterm):
    trials.append(trial_signal(root, f"sigterm-{i}", signal.SIGTERM, duration, reference, rng))
  for trial in trials:
    trial["ok"] = trial["bit_equal"]
  from tests.checkpoint_damage import VARIANTS
  variants = (list(VARIANTS) if args.damage == "all" else []
              if args.damage == "none" else args.damage.split(","))
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise SystemExit(f"--damage {unknown} not among {VARIANTS}")
  if variants:
    trials += trial_corrupt(root, duration, reference, rng, variants)
  if not args.no_double:
    trials.append(trial_double(root, reference))
  for how in [h for h in args.full_disk.split(",") if h and h != "none"]:
    trials.append(trial_full_disk(root, reference, how))
  for victim in [v for v in args.dead_peer.split(",") if v and v != "none"]:
    trials.append(trial_dead_peer(root, int(victim.rstrip("s")),
                                  signal.SIGSTOP if victim.endswith("s") else signal.SIGKILL))
  for tr in trials:
    where = (f"at {tr['at_s']:5.2f} s (after step {tr['step_before']}"
             + (", a checkpoint write in flight" if tr.get("write_in_flight") else "") + ")"
             if "at_s" in tr else "")
    print(f"{tr['trial']:22s} {tr['fault']:38s} {where:52s} {'ok' if tr['ok'] else 'FAILED'}",
          flush=True)
  result = {"uninterrupted_s": duration, "trials": trials, "passed": sum(t["ok"] for t in trials),
            "total": len(trials)}
  print(f"{result['passed']} of {result['total']} trials ended as the uninterrupted run "
        f"(bit-equal final state{', damage named' if variants else ''})")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  return result


if __name__ == "__main__":
  sys.exit(0 if (r := main())["passed"] == r["total"] else 1)
