"""Smoke tests of the multi-rank train step against PyTorch (`python -m benchmarks.torch_ref`).

No timing assertions. The default test runs the JAX side at size tiny with PyTorch's venv
hidden, so it is reported as skipped with the command that creates it; the slow test runs both
sides where .venv-torch exists (torch.compile takes ~40 s to compile when its cache is cold).
"""

import json
import math
import sys

import numpy as np
import pytest

from benchmarks import torch_ref
from benchmarks.line_worker import LineWorker

TORCH_VARIANTS = ("eager", "compile", "compile_shared")
JAX_NAMES = ["jax:bucketed", "jax:vmap_masked", "jax:loop_static"]  # the default first


def _run(tmp_path, rounds=2):
  out = tmp_path / "train.json"
  argv = ["--size", "tiny", "--threads", "1", "--rounds", str(rounds), "--out", str(out)]
  report = torch_ref.main(argv)
  assert json.loads(out.read_text())["summary"] == report["summary"]
  return report


def _assert_jax_side(report, rounds):
  env = report["environment"]
  assert env["cpu_model"] and env["command"].startswith("python -m benchmarks.torch_ref --size")
  assert len(env["loadavg_start"]) == len(env["loadavg_end"]) == 3
  (config,) = report["configs"]
  jax_worker = config["workers"]["jax"]
  assert jax_worker["command"].startswith(f"taskset -c {config['taskset_cpus']} ")
  assert jax_worker["env"]["XLA_FLAGS"] == torch_ref.ONE_THREAD_XLA
  assert len(jax_worker["cpus"]) == 1 and len(config["loadavg_before"]) == 3
  jax = [c for c in config["contenders"] if c["name"].startswith("jax:")]
  assert [c["name"] for c in jax] == JAX_NAMES and [c["default"] for c in jax] == [
    True,
    False,
    False,
  ]
  assert jax[0]["buckets"] == jax[2]["buckets"] == "[8] [4] [2]"  # on CPU, one rank per bucket
  assert jax_worker["keeps_freed_memory"] is True  # as train.py's --keep_host_memory
  for contender in config["contenders"]:
    assert contender["loss_rel_diff"] <= 1e-5 and contender["grad_rel_diff"] <= 1e-5
    assert math.isfinite(contender["loss"]) and contender["batch"] == 32
  assert all(c["program_temp_bytes"] > 0 for c in jax)
  assert 0 <= jax_worker["check_rows_replaced"]["32"] < 32
  # Every round times every contender once, the order rotated by one.
  names = len(config["contenders"])
  assert len(config["timings"]) == rounds * names
  firsts = [t["name"] for t in config["timings"] if t["position"] == 0]
  assert len(set(firsts)) == rounds
  for row in report["ratios"]:
    assert row["min"] <= row["median"] <= row["max"] and len(row["per_round"]) == rounds
  lines = {line["metric"]: line for line in report["summary"]}
  temp = lines["batch 32: temporaries of jax:bucketed (default) / jax:loop_static"]
  assert temp["value"] > 0 and temp["met"] is None  # tiny: recorded, not judged
  assert next(line for metric, line in lines.items() if "relative difference" in metric)["met"]


def test_train_comparison_without_torch_runs_jax_and_reports_skip(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(torch_ref, "PYTHON", tmp_path / "no-venv" / "python")
  report = _run(tmp_path)
  _assert_jax_side(report, rounds=2)
  assert report["torch"]["skipped"] and torch_ref.SETUP in capsys.readouterr().out
  assert not any(line["metric"].startswith("1 thread") for line in report["summary"])
  assert {row["ratio"] for row in report["ratios"]} == {
    "jax:vmap_masked / jax:bucketed",
    "jax:loop_static / jax:bucketed",
  }


@pytest.mark.slow
@pytest.mark.skipif(not torch_ref.available(), reason="no .venv-torch (make torch-venv)")
def test_train_comparison_with_torch_checks_and_times_both_sides(tmp_path):
  report = _run(tmp_path, rounds=2)
  _assert_jax_side(report, rounds=2)
  (config,) = report["configs"]
  names = [f"{side}:{variant}" for side in torch_ref.TORCH_SIDES for variant in TORCH_VARIANTS]
  assert [c["name"] for c in config["contenders"]][3:] == names
  assert config["workers"]["torch"]["threads"] == 1 and not report["torch"]["skipped"]
  assert config["workers"]["torch_malloc"]["env"]["MALLOC_TRIM_THRESHOLD_"] == str(2**31 - 1)
  targets = [line for line in report["summary"] if line["metric"].startswith("1 thread(s)")]
  assert [line["target"] for line in targets] == [">= 1"] * 4 + [">= 1.5"] * 2
  assert all(line["met"] is None and line["min"] <= line["value"] for line in targets)


def test_check_refuses_gradients_that_differ(tmp_path):
  grads = {"model/head/bias": np.ones(3, np.float32)}
  np.savez(tmp_path / "grads_jax:a_8.npz", **grads)
  np.savez(tmp_path / "grads_torch:b_8.npz", **{"model/head/bias": grads["model/head/bias"] * 1.01})
  contenders = [
    {"name": "jax:a", "batch": 8, "default": True, "loss": 2.0},
    {"name": "torch:b", "batch": 8, "loss": 2.0},
  ]
  with pytest.raises(RuntimeError, match="differ from the JAX default"):
    torch_ref.check_agreement(contenders, tmp_path)
  np.savez(tmp_path / "grads_torch:b_8.npz", **grads)
  checks = torch_ref.check_agreement(contenders, tmp_path)
  assert [c["grad_rel_diff"] for c in checks] == [0.0, 0.0]


def test_check_batch_replaces_examples_at_a_relu_kink():
  from benchmarks.train_step import check_batch

  parameters = {  # one hidden layer, R = 1: the pre-activation is the first input feature
    "model/hidden/0/a": np.array([[1.0], [0.0]], np.float32),
    "model/hidden/0/b": np.array([[1.0]], np.float32),
    "model/hidden/0/bias": np.zeros(1, np.float32),
  }
  batch = {"image": np.array([[1.0, 5.0], [0.0, 7.0], [2.0, 1.0]], np.float32)}
  batch["label"] = np.array([3, 4, 5], np.int32)
  checked, replaced = check_batch(parameters, batch, [1])
  assert replaced == 1 and checked["label"].tolist() == [3, 3, 5]


def test_line_worker_reports_a_failed_request_with_its_stderr():
  script = (
    "from benchmarks.line_worker import serve\n"
    "def fail(): raise ValueError('no such step')\n"
    "serve({'echo': lambda **kw: kw, 'fail': fail})\n"
  )
  with LineWorker([sys.executable, "-c", script], cwd=torch_ref.REPO) as worker:
    assert worker.request("echo", batch=8) == {"batch": 8}
    with pytest.raises(RuntimeError, match="ValueError: no such step"):
      worker.request("fail")
