"""Each reproduction study runs end to end as its CLI, at a tiny size, so the scripts cannot rot."""

import json
import os
import subprocess
import sys

import numpy as np
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


def _fake_scores(correct: list[int], n: int = 200) -> dict:
  """Per-example rows of a classifier that gets the first `correct` of `n` examples right."""
  hits = (np.arange(n) < correct).astype(np.float64)
  return {"loss": 1.0 - hits, "correct": hits, "weight": np.ones(n)}


def test_twin_gap_summary_finds_the_budget_rank_and_rules_against_the_paper():
  from nsn_jax.studies.twin_gap import format_table, summarise

  per_seed = {
    seed: {
      "scores": {"dense": _fake_scores(150), 8: _fake_scores(140 - seed), 16: _fake_scores(149)},
      "budget_rank": 8,
      "flops_frac_dense": {8: 0.45, 16: 0.7},
    }
    for seed in (0, 1, 2)
  }
  result = summarise(per_seed, 200, paper_gap=5.0)
  assert result["budget_rank"] == 8 and [r["rank"] for r in result["rows"]] == [8, 16]
  at_budget = result["rows"][0]
  assert at_budget["mean_gap"]["diff"] == pytest.approx((10 + 11 + 12) / 3 / 200)
  assert [e["gap"] for e in at_budget["per_seed"]] == pytest.approx([0.05, 0.055, 0.06])
  # Gaps of 5-6 points, paired on the same examples: the interval straddles the paper's 5.
  assert result["verdict"].startswith("not resolved")
  table = format_table(result)
  assert "| 8 (budget) | 0.450 |" in table and "+5.5 [" in table


def test_llm_frontier_summary_pairs_every_model_with_both_dense_models():
  from nsn_jax.studies.llm_frontier import format_table, summarise

  def lm(nats: float) -> dict:  # 100 passages of 10 tokens at `nats` each, ± noise
    noise = np.random.default_rng(0).normal(0, 0.3, 100)
    return {"loss": 10 * (nats + noise), "correct": np.zeros(100), "weight": np.full(100, 10.0)}

  rows = [
    {"model": "dense", "rank": None, "flops_frac_dense": 1.0, "scores": lm(3.0)},
    {"model": "dense ft", "rank": None, "flops_frac_dense": 1.0, "scores": lm(2.5)},
    {"model": "nsn", "rank": 64, "flops_frac_dense": 0.4, "scores": lm(2.7)},
    {"model": "flexrank", "rank": None, "budget": 0.5, "flops_frac_dense": 0.5, "scores": lm(2.6)},
  ]
  result = summarise(rows)
  assert result["tokens"] == 1000 and result["passages"] == 100
  nsn = result["rows"][2]
  assert nsn["loss_minus_dense"] == pytest.approx(-0.3)
  assert nsn["loss_minus_dense_ft"] == pytest.approx(0.2)
  # The same noise on every model: the paired differences' intervals collapse to the point.
  assert nsn["loss_minus_dense_ci"] == pytest.approx((-0.3, -0.3))
  assert nsn["loss_ci"][0] < nsn["loss"] < nsn["loss_ci"][1]
  assert nsn["perplexity"] == pytest.approx(np.exp(nsn["loss"]))
  assert "| flexrank | budget 0.5 | 0.500 |" in format_table(result)


@pytest.mark.slow  # two seeds of MiniLM's smoke config, trained and twin-trained: ~1 min alone
def test_twin_gap_study_trains_both_twins_per_seed_and_writes_its_verdict(tmp_path, data_dir):
  proc = subprocess.run(
    [sys.executable, "-m", "nsn_jax.studies.twin_gap", f"--workdir={tmp_path}"]
    + ["--config=configs/minilm_genre.py:smoke", f"--config.data.data_dir={data_dir}"]
    + ["--seeds=0,1", "--ranks=2,8", "--examples=32"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "twin_gap" / "twin_gap.json").read_text())
  assert result["seeds"] == [0, 1] and result["examples"] == 32
  assert {r["rank"] for r in result["rows"]} >= {2, 8, result["budget_rank"]}
  assert result["verdict"].split(":")[0] in ("beaten", "not matched", "not resolved")
  for seed in (0, 1):
    assert (tmp_path / "twin_gap" / f"dense_seed{seed}" / "done.json").exists()
  assert os.path.getsize(tmp_path / "twin_gap" / "twin_gap.png") > 10_000


@pytest.mark.slow  # three tiny-decoder trainings, 15 scorings, run twice: ~2 min alone
def test_llm_frontier_study_scores_every_model_once(tmp_path, data_dir, tiny_gguf):
  args = [sys.executable, "-m", "nsn_jax.studies.llm_frontier", f"--workdir={tmp_path}"]
  args += ["--config=configs/smollm2_lm.py:smoke", f"--config.model.path={tiny_gguf}"]
  args += [f"--config.data.data_dir={data_dir}", "--ranks=2,4", "--examples=24"]
  args += ["--finetune_steps=4", "--flexrank_budgets=0.55,0.65"]
  run = lambda: subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
  proc = run()
  assert proc.returncode == 0, proc.stderr[-3000:]
  path = tmp_path / "llm_frontier" / "llm_frontier.json"
  result = json.loads(path.read_text())
  models = [(r["model"], r["rank"], r.get("budget")) for r in result["rows"]]
  assert models[:2] == [("dense", None, None), ("svd", 2, None)]
  assert ("nsn", 8, None) in models and ("flexrank", None, 0.65) in models
  assert result["tokens"] == 24 * 15
  again = run()  # a second run reuses every trained model and every score
  assert (
    again.returncode == 0 and "scoring" not in again.stderr and "training in" not in again.stderr
  )
  assert json.loads(path.read_text())["rows"] == result["rows"]
