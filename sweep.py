"""Run a sweep: python sweep.py --sweep configs/sweeps/NAME.py[:ARG] --root DIR [--plan] [--executor local|submitit-local|slurm]

Every run of the sweep (vit_jax/scaling/sweep.py) is checked first: an unknown model or config key
stops everything before anything starts. --plan lists the runs with their training exaFLOPs and an
estimate of their device-hours, and exits. Otherwise the runs that are not done run (local: here,
one after another; submitit-local: as submitit job arrays on this machine; slurm: submitted as one
job array per dependency level), each in DIR/<run>; re-running the same command resumes, running
only what is missing. A failed run is retried --retries times, then reported and left alone by later
launches (unless --retry_failed); the runs that start from it are skipped. The results go to
DIR/results.jsonl and DIR/results.csv (vit_jax/scaling/launcher.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from vit_jax.scaling import launcher, plan as plan_lib, sweep as sweep_lib


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, no usage dump
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = _Parser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[2:]),
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sweep", required=True, help="configs/sweeps/NAME.py[:ARG]")
  p.add_argument("--root", help="the sweep's directory (every run's workdir is ROOT/<run>); "
                 "optional with --plan")
  p.add_argument("--plan", action="store_true", help="list the runs, their exaFLOPs and "
                 "estimated device-hours, and exit")
  p.add_argument("--accelerator", default=plan_lib.DEFAULT_ACCELERATOR,
                 choices=sorted(plan_lib.ACCELERATORS), help="for --plan's device-hours")
  p.add_argument("--utilization", type=float, default=plan_lib.DEFAULT_UTILIZATION,
                 help="assumed fraction of the accelerator's peak, for --plan")
  p.add_argument("--plot", action="store_true", help="only rebuild the results table and plot "
                 "it (ROOT/plots: PNG, SVG and summary.md with the fits); a launch plots too")
  p.add_argument("--executor", default="local", choices=launcher.EXECUTORS)
  p.add_argument("--only", help="run only the runs whose name matches this regex (re.search), "
                 "and the runs they start from")
  p.add_argument("--retries", type=int, default=1, help="attempts after a failure, per launch")
  p.add_argument("--retry_failed", action="store_true",
                 help="run again the runs an earlier launch gave up on")
  p.add_argument("--devices", type=int, help="devices per run, for the measured device-hours "
                 "(default: 1 here; SLURM: nodes × GPUs per node)")
  p.add_argument("--wait", action="store_true", help="slurm: wait for the jobs to end")
  slurm = p.add_argument_group("slurm", "resources of each run's job (submitit)")
  slurm.add_argument("--slurm_partition")
  slurm.add_argument("--slurm_nodes", type=int, default=1)
  slurm.add_argument("--slurm_gpus_per_node", type=int, default=0)
  slurm.add_argument("--slurm_tasks_per_node", type=int,
                     help="processes per node (default: one per GPU, as train.py expects)")
  slurm.add_argument("--slurm_cpus_per_task", type=int)
  slurm.add_argument("--slurm_mem_gb", type=float)
  slurm.add_argument("--slurm_time", type=int, default=24 * 60, help="minutes per job")
  slurm.add_argument("--slurm_account")
  slurm.add_argument("--slurm_qos")
  slurm.add_argument("--slurm_constraint")
  slurm.add_argument("--slurm_array_parallelism", type=int, default=256)
  slurm.add_argument("--slurm_setup", action="append", default=[],
                     help="a shell line run before each job (repeatable), e.g. "
                     "'source .venv/bin/activate'")
  args = p.parse_args(argv)
  if not args.plan and not args.root:
    p.error("--root is required (except with --plan)")
  return args


def slurm_of(args: argparse.Namespace) -> launcher.Slurm:
  return launcher.Slurm(
      partition=args.slurm_partition, nodes=args.slurm_nodes,
      gpus_per_node=args.slurm_gpus_per_node,
      tasks_per_node=args.slurm_tasks_per_node, cpus_per_task=args.slurm_cpus_per_task,
      mem_gb=args.slurm_mem_gb, time_min=args.slurm_time, account=args.slurm_account,
      qos=args.slurm_qos, constraint=args.slurm_constraint,
      array_parallelism=args.slurm_array_parallelism, setup=tuple(args.slurm_setup))


def plot(root: str, expected: list[str]) -> None:
  """The sweep's table, rebuilt, and its plots in ROOT/plots (what exists; what is missing named)."""
  from vit_jax.scaling import plots, table  # pylint: disable=g-import-not-at-top  (matplotlib)
  launcher.write_results(root)
  rows = table.read_table(root)
  paths = plots.plot_all(rows, os.path.join(root, "plots"), expected_runs=expected)
  print(f"plots: {len(paths)} files in {os.path.join(root, 'plots')}")


def main(argv: list[str], env: dict[str, str] | None = None, cpu_only: bool = False) -> int:
  """sweep.py with ``argv`` (without the program); ``env``: the runs' environment.
  ``cpu_only``: keep this process off the accelerators (describing models needs none; the runs,
  other processes, get them)."""
  args = parse_args(argv)
  if cpu_only:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")
  try:
    plan_lib.check_accelerator(args.accelerator, args.utilization)
    sweep = sweep_lib.load_sweep(args.sweep)
    selected = [r.name for r in sweep.select(args.only)]
    plan = sweep_lib.resolve(sweep, args.root or "ROOT")
    if args.plan:
      by_name = {r.run.name: r for r in plan}
      statuses = None
      if args.root:
        jobs = launcher.jobs_of(plan, args.root)
        statuses = {n: ("done" if launcher.is_done(j) else "failed" if launcher.failure(j)
                        else "to run") for n, j in jobs.items()}
      print(plan_lib.format_plan([by_name[n] for n in selected], args.accelerator,
                                 args.utilization, statuses))
      return 0
    code = 0
    if not args.plot:
      code = launcher.launch(plan, args.root, only=selected if args.only else None,
                             sweep_spec=args.sweep, executor=args.executor, retries=args.retries,
                             retry_failed=args.retry_failed, devices=args.devices,
                             slurm=slurm_of(args), wait=args.wait, env=env)
      if code == 130 or (args.executor == "slurm" and not args.wait):
        return code
    plot(args.root, [r.run.name for r in plan])
    return code
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:], env=dict(os.environ), cpu_only=True))
