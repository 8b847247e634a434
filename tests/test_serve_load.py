"""Smoke test of the serving load benchmark at size tiny: it trains, serves, loads both policies
end to end, and its JSON is complete and sane. No timing assertions: a tiny model on a shared CPU
measures HTTP, not the targets (those are judged at size full only).
"""

import json
import math

import pytest

from benchmarks import serve_load


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
  """(report, plot path) of a tiny run, the report read back from its JSON file."""
  tmp = tmp_path_factory.mktemp("serve_load")
  out, png = tmp / "load.json", tmp / "load.png"
  argv = ["--size", "tiny", "--data_dir", data_dir, "--out", str(out), "--plot", str(png)]
  serve_load.main(argv)
  return json.loads(out.read_text()), png


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _fraction(value) -> bool:
  return isinstance(value, (int, float)) and 0 <= value <= 1


def test_environment_and_server_flags_are_recorded(run):
  report, png = run
  env = report["environment"]
  for key in ("cpu_model", "cpu_count", "cpus_usable", "jax", "command", "load_average_before"):
    assert env[key] is not None, key
  assert len(env["load_average_before"]) == len(env["load_average_after"]) == 3
  assert env["command"].startswith("python -m benchmarks.serve_load --size tiny")
  assert report["size"] == "tiny" and _positive(report["run_s"])
  for policy in serve_load.POLICIES:
    assert f"--policy={policy}" in report["server"][policy]
  assert f"--slo_ms={report['slo_ms']}" in report["server"]["slo"]
  assert png.read_bytes().startswith(b"\x89PNG")


def test_rows_cover_both_policies_at_every_load(run):
  report, _ = run
  size = serve_load.SIZES["tiny"]
  ranks = set(size.ranks)
  rows = report["rows"]
  assert [(r["policy"], r["load"]) for r in rows] == [
    (policy, load) for policy in serve_load.POLICIES for load in size.loads
  ]
  for row in rows:
    assert _positive(row["offered_rps"]) and _positive(row["achieved_rps"]), row
    assert row["requests"] >= 8 and _positive(row["seconds"]), row
    for key in ("refused_frac", "failed_frac", "accuracy", "mean_flops_frac", "device_busy_frac"):
      assert _fraction(row[key]), (key, row)
    assert row["failed_frac"] == 0, row
    assert 0 < row["p50_ms"] <= row["p99_ms"] < math.inf, row
    assert set(map(int, row["rank_counts"])) <= ranks, row
    assert min(ranks) <= row["mean_rank"] <= max(ranks), row
  # The fixed policy serves every request at R; the offered rates are the same for both.
  assert {r["mean_rank"] for r in rows if r["policy"] == "fixed"} == {size.max_rank}
  by_policy = [[r["offered_rps"] for r in rows if r["policy"] == p] for p in serve_load.POLICIES]
  assert by_policy[0] == by_policy[1]


def test_capacity_startup_and_summary_are_finite(run):
  report, _ = run
  capacity = report["capacity"]
  for key in ("capacity_rps", "compute_only_rps", "full_batch_ms", "loaded_full_batch_ms"):
    assert _positive(capacity[key]), key
  assert _positive(capacity["probe"]["latency_ms"])
  assert [(s["start"], s["policy"]) for s in report["startup"]] == [
    ("cold", "fixed"),
    ("warm", "fixed"),
    ("warm", "slo"),
  ]
  for start in report["startup"]:
    assert _positive(start["launch_to_ready_s"]) and _positive(start["compile_s"]), start
  cold, warm = report["startup"][:2]
  assert cold["misses"] > 0 and warm["hits"] > 0  # the restart read the cache the cold start wrote
  model = report["model"]
  assert [r["rank"] for r in model["served"]] == list(serve_load.SIZES["tiny"].ranks)
  assert all(_fraction(a) for a in model["offline_accuracy"].values())
  assert report["summary"] and report["notes"]
  for line in report["summary"]:
    assert math.isfinite(line["value"]) and line["met"] is None, line  # not judged at tiny
