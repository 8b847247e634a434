"""Each reproduction study runs end to end as its CLI, at a tiny size, so the scripts cannot rot."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study(name, workdir, data_dir, *flags):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      f"nsn_jax.studies.{name}",
      f"--workdir={workdir}",
      "--config=configs/default.py:smoke",
      "--config.train.steps=3",
      f"--config.data.data_dir={data_dir}",
      *flags,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, f"{name}.json")) as f:
    return json.load(f), proc.stdout, proc.stderr


@pytest.mark.slow  # 60 s of three CLIs; `make test-slow` runs it
def test_studies_run_and_share_their_runs(tmp_path, data_dir):
  truncation, table, _ = _study("truncation", tmp_path, data_dir, "--native_ranks=2,8")
  assert truncation["ranks"] == list(range(1, 9))
  assert len(truncation["nsn"]) == len(truncation["truncation"]) == 8
  assert set(truncation["native"]) == {"2", "8"}
  assert truncation["native"]["8"] == truncation["truncation"][-1]  # the same model at R
  assert "truncation" in table and os.path.getsize(tmp_path / "truncation.png") > 10_000

  ablation, table, _ = _study("ablation", tmp_path, data_dir, "--seeds=0", "--held_out=3,6")
  assert ablation["held_out_ranks"] == [3, 6] and ablation["id_ranks"] == [1, 2, 4, 5, 7]
  assert len(ablation["variants"]) == 6
  for scores in ablation["variants"].values():
    for part in ("anchor", "id", "ood"):
      assert len(scores[part]["per_seed"]) == 1 and 0 <= scores[part]["mean_std"][0] <= 1
  assert table.count("\n| ") == 6  # one markdown row per variant

  internals, table, log = _study("internals", tmp_path, data_dir)
  # Its two models are the truncation study's runs, not retrained.
  assert "[nsn] reusing" in log and "[truncation] reusing" in log and "training in" not in log
  assert set(internals["energy"]) == {"nsn", "truncation"}
  assert len(internals["energy"]["nsn"]["hidden/0"]) == 8
  for per_layer in internals["containment"].values():
    assert all(0 <= v <= 1 + 1e-6 for v in per_layer["hidden/0"].values())
  assert set(internals["log_variance_final"]) == {"2", "4", "8"}
  for plot in ("energy.png", "log_variance.png", "subspaces.png"):
    assert os.path.getsize(tmp_path / plot) > 10_000


@pytest.mark.slow  # 5 trainings and 3 sweeps, ~30 s: make test-slow (summarise is tested below)
def test_baselines_study_reports_every_method_with_its_flops(tmp_path, data_dir):
  flags = ("--seeds=0", "--ranks=2", "--finetune_steps=2")
  result, table, _ = _study("baselines", tmp_path, data_dir, *flags)
  methods = {s["method"] for s in result["summary"]}
  assert methods == {"dense", "dense+svd", "dense+svd+ft", "nsn", "nsn uniform", "nsn from svd"}
  for summary in result["summary"]:
    assert summary["n"] == 1 and summary["ci95"] is None  # one seed: no interval claimed
    assert 0 < summary["flops_frac_dense"] <= 1
  # At one rank every method costs the same FLOPs: the comparison is at equal cost.
  at_2 = {s["flops_frac_dense"] for s in result["summary"] if s["rank"] == 2}
  assert len(at_2) == 1
  assert "| 2 |" in table and os.path.getsize(tmp_path / "baselines.png") > 10_000


def test_baseline_summaries_give_student_t_intervals():
  from nsn_jax.studies.baselines import summarise

  rows = [
    {"method": "nsn", "seed": s, "rank": 4, "flops_frac_dense": 0.2, "accuracy": a}
    for s, a in enumerate([0.90, 0.92, 0.94])
  ]
  (summary,) = summarise(rows)
  # mean 0.92, sample sd 0.02, t(0.975, 2) = 4.303: half-width 4.303 · 0.02 / √3
  assert summary["accuracy_mean"] == pytest.approx(0.92)
  assert summary["ci95"] == pytest.approx(4.3027 * 0.02 / 3**0.5, rel=1e-4)
