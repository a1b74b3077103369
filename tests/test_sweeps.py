"""Sweeps (vit_jax/scaling, sweep.py): expansion and names, checks before anything starts, the local
executor resuming and reporting failures, the results table, --plan and Table 6's exaFLOPs, and the
SLURM path (a fake sbatch) and submitit's LocalExecutor."""

import glob
import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import subprocess_xla_flags
from vit_jax.scaling import launcher, plan as plan_lib, sweep as sweep_lib, table
from vit_jax.scaling.sweep import Data, FewShot, Run, Sweep, Transfer

REPO = sweep_lib.REPO
sweep_cli = importlib.import_module("sweep")

TINY_SWEEP = '''
from vit_jax.scaling.sweep import FewShot, Sweep, Transfer

TINY = {"model.name": "ViT-Ti/2", "model.hidden_size": 16, "model.num_layers": 1,
        "model.num_heads": 1, "model.mlp_dim": 32}
SHORT = {"batch_size": 32, "total_steps": 5, "eval_every": 5, "checkpoint_every": 5, "log_every": 5,
         "schedule.warmup_steps": 1}


def get_sweep(arg=None):
  split = "nosuch" if arg == "bad" else "train[:50%]"   # train.py refuses it as it opens the data
  return Sweep.product(
      config="configs/default.py", models={"tiny": TINY}, data_sizes=[split], steps=[5],
      overrides={k: v for k, v in SHORT.items() if k != "total_steps"},
      transfers=[Transfer("digits", config="configs/default.py", overrides=SHORT)],
      few_shot=[] if arg == "bad" else FewShot(overrides={
          "few_shot.datasets": ("sklearn_digits:train:test",), "few_shot.shots": (1,),
          "few_shot.seeds": 1}))
'''

PRE, FT, FS = "tiny_train-50pct_5steps_s0", "tiny_train-50pct_5steps_s0_ft-digits", \
    "tiny_train-50pct_5steps_s0_fewshot"
BAD = "tiny_nosuch_5steps_s0"


@pytest.fixture
def tiny_sweep(tmp_path):
  path = tmp_path / "tiny_sweep.py"
  path.write_text(TINY_SWEEP)
  return str(path)


def child_env():
  return {**os.environ, "XLA_FLAGS": subprocess_xla_flags()}  # one CPU device: fast runs


def starts(root, run):
  return sum(1 for a in launcher.attempts(os.path.join(root, run)) if a["event"] == "start")


def test_product_expands_and_names_runs():
  sweep = Sweep.product(
      config="configs/default.py", models=["ViT-Ti/16", "R50+ViT-B/16"],
      data_sizes=["train[:50%]", Data("train", examples=1497, label="all")], steps=[100, 200],
      seeds=[0, 1], overrides={"batch_size": 64}, transfers=[Transfer("cifar10")],
      few_shot=FewShot())
  assert len(sweep.runs) == 2 * 2 * 2 * 2 * 3
  first = sweep.runs[:3]
  assert [r.name for r in first] == ["ViT-Ti16_train-50pct_100steps_s0",
                                     "ViT-Ti16_train-50pct_100steps_s0_ft-cifar10",
                                     "ViT-Ti16_train-50pct_100steps_s0_fewshot"]
  assert first[0].overrides == {"batch_size": 64, "model.name": "ViT-Ti/16",
                                "train_split": "train[:50%]", "total_steps": 100, "seed": 0}
  assert [r.stage for r in first] == ["pretrain", "finetune", "fewshot"]
  assert first[1].parent == first[2].parent == first[0].name
  assert first[1].config == "configs/finetune.py:model={model},dataset={dataset}"
  assert first[1].overrides == {"model.name": "ViT-Ti/16", "seed": 0}  # the checkpoint's model
  assert first[2].program == "few_shot.py" and first[2].overrides == first[0].overrides
  assert "R50+ViT-B16_all_200steps_s1" in sweep.names()
  assert sweep["R50+ViT-B16_all_200steps_s1"].data_size == 1497
  assert [r.name for r in sweep.select("ViT-Ti16_all_200steps_s1_ft")] == [
      "ViT-Ti16_all_200steps_s1", "ViT-Ti16_all_200steps_s1_ft-cifar10"]
  with pytest.raises(ValueError, match="two runs are named"):
    sweep + sweep  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match="parent 'x' is not an earlier run"):
    Sweep([Run("a", "configs/default.py", stage="finetune", parent="x")])


def test_resolve_describes_each_run(tmp_path, tiny_sweep):
  plan = sweep_lib.resolve(sweep_lib.load_sweep(tiny_sweep), str(tmp_path))
  pre, ft, fs = plan
  assert pre.info["model"] == "ViT-Ti/2" and pre.info["family"] == "ViT"
  assert pre.info["params"] == 2794  # 1 layer of width 16 on 2x2 patches of 8x8 grey digits
  assert pre.info["data_size"] == 748  # half of the 1,497 training digits, counted
  assert (pre.info["steps"], pre.info["batch_size"], pre.info["examples_seen"]) == (5, 32, 160)
  from vit_jax import flops  # pylint: disable=g-import-not-at-top
  per_image = flops.train_flops("ViT-Ti/2", 8, 10, channels=1, hidden_size=16, num_layers=1,
                                num_heads=1, mlp_dim=32)
  assert pre.info["flops"] == pre.info["pretrain_flops"] == per_image * 160
  assert ft.info["pretrain_flops"] == pre.info["flops"] and ft.info["params"] == 2794
  assert f"--config.pretrained={tmp_path}/{PRE}" in ft.argv
  assert fs.argv[:4] == ["few_shot.py", "--config=configs/default.py",
                         f"--workdir={tmp_path}/{PRE}", f"--output={tmp_path}/{FS}/few_shot.json"]
  assert "--config.few_shot.datasets=('sklearn_digits:train:test',)" in fs.argv
  assert fs.info["steps"] is None and fs.info["flops"] is None


@pytest.mark.parametrize("overrides, message", [
    ({"model.name": "ViT-Q/16"}, r"unknown model name 'ViT-Q/16'. Valid names: .*ViT-B/16"),
    ({"learning_rate": 0.1}, r"unknown config key 'learning_rate' .*Valid keys: .*batch_size, "),
    ({"lr": "fast"}, r"--config.lr=fast: could not convert string to float"),
    ({"model.name": "ViT-Ti/16", "model.layers": (1, 1)}, r"unknown ViT option\(s\) \['layers'\]"),
])
def test_bad_sweeps_fail_before_any_run(tmp_path, capsys, overrides, message):
  path = tmp_path / "bad.py"
  path.write_text(textwrap.dedent(f"""
      from vit_jax.scaling.sweep import Sweep
      def get_sweep(arg=None):
        return Sweep.product(config="configs/default.py", steps=[5], seeds=[0, 1],
                             overrides={{"batch_size": 32}}) + Sweep.product(
            config="configs/default.py", steps=[6], overrides={overrides!r})
  """))
  root = tmp_path / "root"
  assert sweep_cli.main(["--sweep", str(path), "--root", str(root)]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: run 6steps_s0: ") and len(err.strip().splitlines()) == 1
  assert __import__("re").search(message, err), err
  assert not root.exists()  # nothing started


def test_command_line_errors_are_one_line(tmp_path):
  bad_key = tmp_path / "bad.py"
  bad_key.write_text("from vit_jax.scaling.sweep import Sweep\n"
                     "def get_sweep(arg=None):\n"
                     "  return Sweep.product(config='configs/default.py', overrides={'lrr': 1})\n")
  for argv, expected in [
      (["--sweep", str(bad_key), "--plan"], "error: run s0: unknown config key 'lrr' "
       "(in configs/default.py); did you mean lr? Valid keys: "),
      (["--sweep", "configs/sweeps/nothing.py", "--plan"], "error: no sweep file "),
      (["--sweep", "configs/sweeps/table6.py"], "error: --root is required"),
      (["--sweep", "configs/sweeps/table6.py", "--plan", "--only", "ViT-Z"],
       "error: --only 'ViT-Z' matches no run"),
  ]:
    result = subprocess.run([sys.executable, "sweep.py", *argv], cwd=REPO, capture_output=True,
                            text=True, env=child_env(), check=False)
    assert result.returncode in (1, 2), result
    lines = [l for l in result.stderr.splitlines() if not l.startswith(("WARNING", "I0000"))]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr


def test_plan_lists_runs_with_exaflops(tiny_sweep, capsys):
  assert sweep_cli.main(["--sweep", tiny_sweep, "--plan", "--accelerator", "h100"]) == 0
  out = capsys.readouterr().out
  header, *rows, total = out.strip().splitlines()
  assert header.split()[:9] == ["run", "stage", "model", "params", "data", "steps", "batch",
                                "examples", "exaFLOPs"] and "est. h100-hours" in header
  assert [r.split()[0] for r in rows] == [PRE, FT, FS]
  assert rows[0].split()[1:4] == ["pretrain", "ViT-Ti/2", "2.8k"]
  assert total.startswith("3 runs: ") and "an estimate, not a measurement" in total
  assert "40% of its peak 989 TFLOP/s" in total


def test_plan_reproduces_table6_exaflops():
  table6 = importlib.import_module("configs.sweeps.table6")
  plan = sweep_lib.resolve(sweep_lib.load_sweep("configs/sweeps/table6.py"), "/nonexistent")
  rows = {r["run"]: r for r in plan_lib.rows(plan, "tpu-v3-core")}
  assert len(rows) == len(table6.PAPER_EXAFLOPS) == 6
  for (model, epochs), paper in table6.PAPER_EXAFLOPS.items():
    row = rows[f"{model.replace('/', '')}_jft300m_{epochs}ep_s0"]
    assert row["model"] == model and row["batch_size"] == 4096
    assert abs(row["exaflops"] - paper) / paper < 0.025, (model, epochs, row["exaflops"], paper)
  # ViT-H/14's 4,262 exaFLOPs at 40 % of a TPUv3 core: about 2,000 core-days (the paper: 2.5k).
  assert 1_900 < rows["ViT-H14_jft300m_14ep_s0"]["est_device_hours"] / 24 < 2_100


def test_imagenet21k_sweep_is_valid():
  plan = sweep_lib.resolve(sweep_lib.load_sweep("configs/sweeps/imagenet21k.py"), "/nonexistent")
  by_name = {r.run.name: r for r in plan}
  assert len(plan) == 7 * 7
  b16 = by_name["ViT-B16_i21k_90ep_s0"]
  assert b16.info["steps"] == -(-90 * (14_197_122 - 51_200) // 4096)
  assert "--config=configs/sweeps/imagenet21k.py:model=ViT-B/16" in b16.argv
  assert by_name["ViT-H14_i21k_90ep_s0_ft-cifar10"].overrides["image_size"] == 518
  assert by_name["BiT-R50x1_i21k_90ep_s0"].info["family"] == "BiT"


def test_local_sweep_resumes_and_writes_results(tmp_path, tiny_sweep, capsys):
  root = str(tmp_path / "root")
  # A sweep stopped after its first run: only the pre-training ran.
  assert sweep_cli.main(["--sweep", tiny_sweep, "--root", root, "--only", "_s0$"],
                        env=child_env()) == 0
  assert starts(root, PRE) == 1 and not os.path.exists(os.path.join(root, FT))
  done = os.path.join(root, PRE, launcher.DONE)
  first = json.load(open(done))
  mtime = os.path.getmtime(done)
  capsys.readouterr()
  # Launched again: the missing runs only.
  assert sweep_cli.main(["--sweep", tiny_sweep, "--root", root], env=child_env()) == 0
  out = capsys.readouterr().out
  assert f"[1/3] {PRE}: already done" in out and "3 done (2 started by this launch)" in out
  assert starts(root, PRE) == 1 and starts(root, FT) == 1 and starts(root, FS) == 1
  assert os.path.getmtime(done) == mtime and first["wall_s"] > 0 and first["attempts"] == 1

  rows = {r["run"]: r for r in table.read_table(root)}
  with open(os.path.join(root, "results.csv")) as f:
    assert f.readline().strip().split(",")[:14] == list(table.FIXED_COLUMNS)
  pre, ft, fs = rows[PRE], rows[FT], rows[FS]
  assert [pre["stage"], ft["stage"], fs["stage"]] == ["pretrain", "finetune", "fewshot"]
  assert ft["parent"] == fs["parent"] == PRE and pre["parent"] == ""
  for row in (pre, ft, fs):
    assert row["status"] == "done" and row["model"] == "tiny" and row["family"] == "ViT"
    assert row["params"] == 2794 and row["data_size"] == 748 and row["seed"] == 0
    assert row["train_flops"] == pre["train_flops"] > 0 and row["device_hours"] > 0
  assert (pre["steps"], pre["batch_size"], pre["examples_seen"]) == (5, 32, 160)
  assert 0 <= pre["eval/top1"] <= 1 and 0 <= ft["transfer/digits/top1"] <= 1
  assert 0 <= fs["fewshot/sklearn_digits/1shot"] <= 1 and fs["steps"] is None


def test_failed_run_is_reported_not_retried_and_its_stage_skipped(tmp_path, tiny_sweep, capsys):
  root = str(tmp_path / "root")
  argv = ["--sweep", tiny_sweep + ":bad", "--root", root, "--retries", "0"]
  assert sweep_cli.main(argv, env=child_env()) == 1
  out = capsys.readouterr().out
  assert f"failed:\n  {BAD}: error: dataset 'sklearn_digits' has no split 'nosuch'" in out
  assert f"skipped:\n  {BAD}_ft-digits: its parent {BAD} is failed" in out
  record = json.load(open(os.path.join(root, BAD, launcher.FAILED)))
  assert record["returncode"] == 1 and "no split 'nosuch'" in record["stderr_tail"]
  assert starts(root, BAD) == 1 and not os.path.exists(os.path.join(root, BAD + "_ft-digits"))
  rows = table.read_table(root)
  assert [(r["run"], r["status"]) for r in rows] == [(BAD, "failed")]

  assert sweep_cli.main(argv, env=child_env()) == 1  # the next launch leaves it alone
  out = capsys.readouterr().out
  assert "failed in an earlier launch, not retried (--retry_failed runs it again)" in out
  assert "(0 started by this launch)" in out and starts(root, BAD) == 1


STUB = '''
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
if args.get("config.seed") == "1":
  print("error: the stub fails for seed 1", file=sys.stderr)
  sys.exit(3)
json.dump({"top1": 0.5}, open(os.path.join(args["workdir"], "final_metrics.json"), "w"))
'''


def stub_sweep(tmp_path) -> Sweep:
  stub = tmp_path / "stub.py"
  stub.write_text(STUB)
  tiny = {"model.hidden_size": 16, "model.num_layers": 1, "model.num_heads": 1, "model.mlp_dim": 32}
  runs = []
  for seed in (0, 1):
    runs.append(Run(f"stub_s{seed}", "configs/default.py", {**tiny, "seed": seed},
                    program=str(stub), data_size=1))
    runs.append(Run(f"stub_s{seed}_ft-x", "configs/default.py", tiny, stage="finetune",
                    parent=runs[-1].name, program=str(stub), dataset="x"))
  return Sweep(runs)


def test_submitit_local_executor(tmp_path, capsys):
  root = str(tmp_path / "root")
  plan = sweep_lib.resolve(stub_sweep(tmp_path), root)
  assert launcher.launch(plan, root, executor="submitit-local", retries=1) == 1
  out = capsys.readouterr().out
  assert "level 0: 2 run(s) submitted as submitit-local job array" in out
  assert "level 1: 2 run(s)" in out
  assert "failed:\n  stub_s1: error: the stub fails for seed 1 (exit 3, 2 attempt(s)" in out
  assert "skipped:\n  stub_s1_ft-x: its parent stub_s1 is not done" in out
  assert starts(root, "stub_s1") == 2 and starts(root, "stub_s1_ft-x") == 0
  rows = {r["run"]: r for r in table.read_table(root)}
  assert rows["stub_s0"]["eval/top1"] == 0.5 and rows["stub_s0_ft-x"]["transfer/x/top1"] == 0.5
  assert rows["stub_s1"]["status"] == "failed" and "stub_s1_ft-x" not in rows


FAKE_SBATCH = '''#!/bin/sh
n=$(cat "$FAKE_SLURM/count" 2>/dev/null || echo 1000); n=$((n + 1)); echo $n > "$FAKE_SLURM/count"
cp "$1" "$FAKE_SLURM/script_$n.sh"
echo "Submitted batch job $n"
'''


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
  """sbatch that keeps each script and answers job 1001, 1002, ...; srun; squeue printing $STATE."""
  bin_dir, spool = tmp_path / "bin", tmp_path / "spool"
  bin_dir.mkdir()
  spool.mkdir()
  for name, text in [("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 0\n"),
                     ("squeue", '#!/bin/sh\n[ -n "$FAKE_SQUEUE_STATE" ] && '
                                'echo "$FAKE_SQUEUE_STATE"\nexit 0\n')]:
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_SLURM", str(spool))
  return spool


def test_slurm_submission_scripts(tmp_path, fake_slurm, monkeypatch, capsys):
  root = str(tmp_path / "root")
  plan = sweep_lib.resolve(stub_sweep(tmp_path), root)
  slurm = launcher.Slurm(partition="gpu-short", nodes=2, gpus_per_node=4, time_min=90,
                         setup=("source .venv/bin/activate",))
  assert launcher.launch(plan, root, executor="slurm", slurm=slurm,
                         sweep_spec="configs/sweeps/x.py") == 0
  out = capsys.readouterr().out
  assert "level 0: 2 run(s) submitted as slurm job array 1001" in out
  first, second = (open(fake_slurm / f"script_{n}.sh").read() for n in (1001, 1002))
  for line in ("#SBATCH --partition=gpu-short", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4",
               "#SBATCH --ntasks-per-node=4", "#SBATCH --time=90", "#SBATCH --array=0-1%2",
               "#SBATCH --job-name=sweep-x-0", "source .venv/bin/activate",
               f"export PYTHONPATH={REPO}", "-m submitit.core._submit"):
    assert line in first, (line, first)
  assert "--dependency" not in first
  assert "#SBATCH --dependency=afterany:1001" in second and "#SBATCH --job-name=sweep-x-1" in second
  # What each array task runs: the run's command, with its parents named.
  from submitit.core import utils  # pylint: disable=g-import-not-at-top
  jobs = sorted((utils.DelayedSubmission.load(p).args[0]
                 for p in glob.glob(os.path.join(root, ".submitit", "*_submitted.pkl"))),
                key=lambda j: j.name)
  assert [j.name for j in jobs] == ["stub_s0", "stub_s0_ft-x", "stub_s1", "stub_s1_ft-x"]
  assert jobs[1].argv == tuple(plan[1].argv) and jobs[1].parents == ("stub_s0",)
  assert jobs[0].devices == 8  # for the measured device-hours: 2 nodes x 4 GPUs
  assert json.load(open(os.path.join(root, "stub_s0", launcher.SUBMITTED)))["job_id"] == "1001_0"
  # Launched again while the jobs are queued: nothing is submitted twice.
  monkeypatch.setenv("FAKE_SQUEUE_STATE", "PENDING")
  assert launcher.launch(plan, root, executor="slurm", slurm=slurm) == 0
  assert "4 queued" in capsys.readouterr().out
  assert not (fake_slurm / "script_1003.sh").exists()
