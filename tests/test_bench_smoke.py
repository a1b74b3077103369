"""Every benchmark script runs end to end on a tiny model and writes sane JSON (no speed is asserted)."""

import json
import os
import subprocess
import sys

import pytest

from vit_jax import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["inference", "train_step", "compare_timm", "ablations", "input_pipeline", "first_step",
           "flops_table", "dry_run_memory", "parity_full", "transfer_digits", "parity_yolos",
           "parity_detr", "matcher_speed", "detection_buckets"]
TINY = ["--image-size", "32", "--option", "num_layers=1"]


def run_script(name, *args, timeout=120, cwd=ROOT):
  # One real CPU device, as a user runs them (the suite's conftest forces 8 fake ones).
  env = dict(os.environ, XLA_FLAGS=" ".join(
      f for f in os.environ.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", f"{name}.py"), *args],
                        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def read_json(path):
  with open(path) as f:
    return json.load(f)


def check_load_record(load):
  assert set(load) >= {"loadavg_before", "loadavg_after", "foreign_cpu_fraction", "steal_fraction", "trusted"}
  assert len(load["loadavg_before"]) == 3 and 0.0 <= load["foreign_cpu_fraction"] <= 1.0
  assert 0.0 <= load["steal_fraction"] <= 1.0


# Each script run as ``python bench/NAME.py --help`` would run it; all in one interpreter (one
# start-up instead of ten), each with its own module globals and ``sys.path[0]`` = bench/.
HELP_ALL = """
import contextlib, io, os, runpy, sys
bench = sys.argv[1]
for name in sys.argv[2:]:
  path = os.path.join(bench, name + ".py")
  sys.argv, sys.path[0] = [path, "--help"], bench
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    try:
      runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
      assert e.code in (0, None), (name, e.code)
  print(f"== {name} ==", "usage:" in out.getvalue())
"""


def test_help(tmp_path):
  # From another directory: vit_jax and configs come from the installed package, harness from bench/.
  proc = subprocess.run([sys.executable, "-c", HELP_ALL, os.path.join(ROOT, "bench"), *SCRIPTS],
                        capture_output=True, text=True, cwd=tmp_path, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split("\n")[:-1] == [f"== {name} == True" for name in SCRIPTS], proc.stdout


def test_inference(tmp_path):
  out = tmp_path / "inference.json"
  stdout = run_script("inference", "--model", "ViT-Ti/16", *TINY, "--batch-sizes", "1,4",
                      "--min-seconds", "0.1", "--iters", "3", "--json", str(out))
  assert "img_per_s" in stdout and "load average before" in stdout
  record = read_json(out)
  assert [r["batch"] for r in record["results"]] == [1, 4]
  for row in record["results"]:
    assert row["img_per_s"] > 0 and row["latency_ms"] > 0 and row["times_s"]["n"] >= 3
    assert row["img_per_s"] == pytest.approx(row["batch"] * 1e3 / row["latency_ms"])
  check_load_record(record["load"])
  assert record["environment"]["versions"]["jax"]


def test_train_step(tmp_path):
  out = tmp_path / "train.json"
  run_script("train_step", "--model", "ViT-Ti/16", *TINY, "--batch", "8", "--steps", "2",
             "--min-seconds", "0.1", "--json", str(out))
  record = read_json(out)
  row = record["result"]
  assert row["img_per_s"] > 0 and row["step_ms"] > 0 and row["compile_s"] > 0
  assert 0 < row["mfu"] < 1
  assert row["static_peak_mib"] > 0 and row["host_peak_rss_mib"] > 0 and row["page_faults_per_step"] >= 0
  assert row["kernel_cpu_s_per_step"] >= 0
  assert record["preset"]["allocator"] == "hugepages"
  assert record["train_flops_per_image"] == flops.train_flops("ViT-Ti/16", 32, 1000, num_layers=1)
  check_load_record(record["load"])


def test_compare_timm(tmp_path):
  out = tmp_path / "compare.json"
  stdout = run_script("compare_timm", "--rounds", "1", "--threads", "1", *TINY, "--option", "hidden_size=64",
                      "--option", "num_heads=2", "--option", "mlp_dim=128",
                      "--workloads", "fwd:ViT-Ti/16:2,train:ViT-Ti/16:2", "--iters", "2",
                      "--min-seconds", "0", "--warmup", "1", "--json", str(out))
  assert "ratio_vs_timm" in stdout
  record = read_json(out)
  assert {(r["workload"], r["framework"]) for r in record["results"]} == {
      (w, f) for w in ("fwd:ViT-Ti/16:2", "train:ViT-Ti/16:2") for f in ("jax", "timm")}
  for row in record["results"]:
    assert row["img_per_s"] > 0 and row["ratio_vs_timm"] > 0
    if row["framework"] == "timm":
      assert row["ratio_vs_timm"] == 1.0
  assert len(record["runs"]) == 4 and isinstance(record["trusted"], bool)
  check_load_record(record["load"])


def test_ablations(tmp_path):
  out = tmp_path / "ablations.json"
  stdout = run_script("ablations", "--rounds", "1", *TINY, "--workloads", "train:ViT-Ti/16:2",
                      "--variants", "shipped,xla_attention", "--iters", "2", "--min-seconds", "0",
                      "--warmup", "1", "--micro-rounds", "1", "--micro-iters", "1", "--micro-batch", "1",
                      "--json", str(out), timeout=240)
  assert "shipped_speedup" in stdout
  record = read_json(out)
  assert [(r["workload"], r["variant"]) for r in record["results"]] == [
      ("train:ViT-Ti/16:2", "shipped"), ("train:ViT-Ti/16:2", "xla_attention")]
  assert record["results"][0]["shipped_speedup"] == 1.0
  cases = {r["case"] for r in record["micro"]["rows"]}
  assert cases == {"gelu (erf form)", "MLP block (Dense layout)", "attention block"}
  assert all(r["ms"] > 0 for r in record["micro"]["rows"])


def test_flops_table(tmp_path):
  out = tmp_path / "flops.json"
  run_script("flops_table", "--models", "ViT-Ti/16@32", "--json", str(out))
  record = read_json(out)
  (row,) = record["forward"]
  assert row["gflops"] * 1e9 == flops.forward_flops("ViT-Ti/16", 32, 1000)
  assert 1.0 < row["xla_over_analytic"] < 1.2  # XLA also counts norms, GELU, softmax, additions
  table6 = {(r["model"], r["epochs"]): r["exaflops"] for r in record["paper_table6"]}
  assert table6[("ViT-L/16", 14)] == pytest.approx(1567, rel=0.02)


def test_compare_timm_rejects_bad_workload():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compare_timm.py"),
                         "--workloads", "fwd:ViT-Ti/16"], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode != 0 and "mode:model:batch" in proc.stderr


def test_input_pipeline(tmp_path):
  out = tmp_path / "pipeline.json"
  run_script("input_pipeline", "--cores", "1", "--num-images", "16", "--width", "64", "--height", "48",
             "--image-size", "32", "--batch", "4", "--batches", "2", "--warmup", "1", "--json", str(out))
  record = read_json(out)
  (row,) = record["results"]
  assert row["cores"] == 1 and row["img_per_s"] > 0
  assert record["runs"][0]["batch_shape"] == [4, 32, 32, 3]
  check_load_record(record["load"])


def test_detection_buckets(tmp_path):
  out = tmp_path / "buckets.json"
  run_script("detection_buckets", "--config", "yolos_ti_coco", "--images", "8", "--batch", "2",
             "--batches", "2", "--warmup", "1", "--rounds", "1", "--json", str(out))
  record = read_json(out)
  buckets, one = record["results"]
  assert buckets["pipeline"] == "buckets" and one["pipeline"] == "one canvas" and one["shapes"] == 1
  assert buckets["mpixel_per_image"] < one["mpixel_per_image"]  # every bucket is smaller than 864 x 864
  assert 0 < buckets["real_pixels_pct"] <= 100 and buckets["img_per_s"] > 0
  check_load_record(record["load"])
  assert record["environment"]["versions"]["jax"]


def test_first_step(tmp_path):
  out = tmp_path / "first_step.json"
  stdout = run_script("first_step", "--override", "model.name=ViT-Ti/16", "--override",
                      "model.num_layers=1", "--num-images", "8",
                      "--json", str(out), timeout=180)
  assert "first step logged" in stdout
  record = read_json(out)
  assert 0 < record["seconds_to_first_step"] < 180
  check_load_record(record["load"])


def test_dry_run_memory(tmp_path):
  out = tmp_path / "dry_run.json"
  run_script("dry_run_memory", "--model", "ViT-Ti/16", "--batch", "2", "--image_size", "32",
             "--num_layers", "1", "--json", str(out))
  record = read_json(out)
  assert record["predicted_bytes"] > 0 and record["measured_peak_bytes"] > 0
