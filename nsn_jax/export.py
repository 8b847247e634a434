"""Export one budget of a trained nested model as a standalone, smaller checkpoint.

  .venv/bin/python -m nsn_jax.export --workdir=runs/demo --rank=16 --out=runs/demo/export/r16
  .venv/bin/python -m nsn_jax.export --workdir=runs/demo --budget=0.5 --out=runs/demo/export/half
  .venv/bin/python -m nsn_jax.export --workdir=runs/flex --profile_budget=0.5 --out=runs/flex/p50

The export holds only what the chosen budget runs (`nsn_jax.deploy`: each NSN layer folded to
dense, factorised or GAR, whichever is cheapest at its rank), so its parameter count and FLOPs
really shrink. `nsn_jax.restore.restore_model(OUT)` reloads it (it then runs with `rank=None`)
and `eval.py --workdir=OUT` evaluates it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile

from absl import flags
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsn_jax import cli, flops, profiles
from nsn_jax import config as config_lib
from nsn_jax.build import tokenizer as config_tokenizer
from nsn_jax.checkpoint import Checkpoints
from nsn_jax.deploy import FORMS, POLICIES, DeployedLayer, deploy, format_report
from nsn_jax.layers import nsn_layers
from nsn_jax.llm import safetensors_io
from nsn_jax.llm.hf_decoder import save_hf_decoder
from nsn_jax.models.llama import LlamaModel
from nsn_jax.restore import EXPORT_FILE, Restored, restore_model
from nsn_jax.sweep import check_budgets

FORMATS = ("orbax", "safetensors", "hf")


def export(
  workdir: str,
  out: str,
  rank: int | Mapping[str, int] | None = None,
  budget: float | None = None,
  budget_reference: str = "max_rank",
  form: str = "cheapest",
  profile_budget: float | None = None,
  fmt: str = "orbax",
) -> dict:
  """Writes the budget (a global `rank`, a per-layer profile, a FLOPs `budget` mapped to the
  largest global rank that fits, or the FlexRank profile the checkpoint saved for
  `profile_budget`) of workdir's newest checkpoint to `out`; returns its metadata. A dense run
  (no ranks) is exported as it is.

  `fmt`: "orbax" (a checkpoint, local or gs://), "safetensors" (model.safetensors with the
  library's parameter paths + nsn_export.json) or "hf" (a decoder with every layer folded
  dense, `form="dense"`, in its family's Hugging Face layout with config.json and tokenizer
  files, which transformers loads; plus nsn_export.json). All reload with `restore_model(out)`.
  `out` must not exist yet: an export never overwrites, and it appears whole or not at all.
  """
  _check_request(out, rank, budget, profile_budget, form, fmt)
  if budget is not None:
    check_budgets([budget], "--budget")
  restored = restore_model(workdir)
  if "export" in restored.metadata:
    raise ValueError(f"--workdir={workdir} is an export already; export from the training run.")
  nested = bool(nsn_layers(restored.model))
  if nested != (rank is not None or budget is not None or profile_budget is not None):
    raise ValueError(
      "give exactly one of --rank (or a profile), --budget and --profile_budget for a nested "
      "run, and none for a dense one."
    )
  if fmt == "hf" and not isinstance(restored.model, LlamaModel):
    raise ValueError(
      f"--format=hf writes decoders (language_modelling on llama_gguf / hf_decoder); "
      f"{workdir} holds a {type(restored.model).__name__}: use --format=safetensors."
    )
  deployed, report = restored.model, []
  if nested:
    rank = _chosen_rank(restored, rank, budget, budget_reference, profile_budget)
    deployed, report = deploy(restored.model, rank, form)
  metadata = _metadata(workdir, restored, deployed, report, rank, budget, budget_reference)
  metadata["export"] |= {"profile_budget": profile_budget, "form_policy": form, "format": fmt}
  _WRITERS[fmt](deployed, restored, out, metadata)
  return metadata


def _check_request(out, rank, budget, profile_budget, form, fmt) -> None:
  """What the flags alone tell, before anything is read."""
  if sum(x is not None for x in (rank, budget, profile_budget)) > 1:
    raise ValueError("give at most one of --rank (or a profile), --budget and --profile_budget.")
  if not out:
    raise ValueError("--out is required: a new directory for the export.")
  if epath.Path(out).exists():
    raise ValueError(f"--out={out} already exists; an export never overwrites: choose a new one.")
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt}: valid: {', '.join(FORMATS)}")
  if fmt != "orbax" and "://" in out:
    raise ValueError(f"--format={fmt} writes a local directory; --out={out} is remote.")
  if fmt == "hf" and form != "dense":
    raise ValueError(
      f"--format=hf needs --form=dense (got {form}): transformers runs dense layers."
    )


def _metadata(workdir, restored: Restored, deployed, report, rank, budget, budget_reference):
  """The source run's metadata plus what was deployed and what the export costs."""
  seq_len = config_lib.seq_len(restored.config)
  # A sequence model's FLOPs include attention over its context: per token at data.seq_len, and
  # per example (seq_len tokens) in the metadata, as eval.py reports them.
  return {
    **restored.metadata,
    "deployed": [dataclasses.asdict(entry) for entry in report],
    "export": {
      "source": workdir if "://" in workdir else os.path.abspath(workdir),
      "source_step": restored.step,
      "rank": dict(rank) if isinstance(rank, Mapping) else rank,
      "budget": budget,
      "budget_reference": budget_reference,
      "flops": (seq_len or 1) * flops.model_flops(deployed, None, seq_len),
      "dense_flops": (seq_len or 1) * flops.dense_model_flops(deployed, seq_len),
      "params": flops.total_params(deployed),
      "source_params": flops.total_params(restored.model),
    },
  }


def _write_orbax(deployed, restored: Restored, out: str, metadata: dict) -> None:
  """An orbax checkpoint (committed atomically: orbax renames it into place when complete)."""
  checkpoints = Checkpoints(out, max_to_keep=1)
  try:
    checkpoints.save(restored.step, nnx.to_pure_dict(nnx.state(deployed)), None, metadata)
    checkpoints.wait()
  finally:
    checkpoints.close()


@contextlib.contextmanager
def _staged(out: str) -> Iterator[pathlib.Path]:
  """A temporary directory beside `out`, renamed to `out` only if the block completes."""
  parent = pathlib.Path(out).parent
  parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=".export-", dir=parent))
  try:
    yield staging
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from others
    if os.path.exists(out):
      raise ValueError(f"--out={out} appeared while exporting; an export never overwrites.")
    os.rename(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _write_safetensors(deployed, restored: Restored, out: str, metadata: dict) -> None:
  """model.safetensors keyed by parameter path ("layers/0/mlp/up/kernel") + nsn_export.json.
  RNG keys (a dropout's) are stored as their uint32 key data."""
  tensors = {
    "/".join(map(str, path)): np.asarray(_plain(variable[...]))
    for path, variable in nnx.to_flat_state(nnx.state(deployed))
  }
  with _staged(out) as staging:
    safetensors_io.save(staging / safetensors_io.SINGLE, tensors, {"format": "nsn_jax"})
    _write_metadata(staging, restored, metadata | {"layout": "nsn_jax"})


def _plain(value: jax.Array) -> jax.Array:
  """A typed PRNG key as its key data (what safetensors can hold); other arrays as they are."""
  return (
    jax.random.key_data(value) if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key) else value
  )


def _write_hf(deployed, restored: Restored, out: str, metadata: dict) -> None:
  """The decoder in its family's HF layout (+ tokenizer, + nsn_export.json, + hf_check.npz:
  logits of two fixed token rows, which scripts/check_hf_export.py compares in transformers)."""
  try:
    tokenizer = config_tokenizer(restored.config)
  except ValueError:
    tokenizer = None
  tokens = np.random.default_rng(0).integers(0, deployed.config.vocab_size, (2, 16), np.int32)
  check = {"tokens": tokens, "logits": np.asarray(deployed(jnp.asarray(tokens))[0])}
  if tokenizer is not None:
    check |= {"text": np.str_(CHECK_TEXT), "text_ids": np.asarray(tokenizer.encode(CHECK_TEXT))}
  with _staged(out) as staging:
    save_hf_decoder(deployed, staging, tokenizer)
    np.savez(staging / "hf_check.npz", **check)
    _write_metadata(staging, restored, metadata | {"layout": "hf"})


CHECK_TEXT = "The capital of France is"


def _write_metadata(directory: pathlib.Path, restored: Restored, metadata: dict) -> None:
  (directory / EXPORT_FILE).write_text(json.dumps(metadata | {"step": restored.step}, indent=1))


_WRITERS = {"orbax": _write_orbax, "safetensors": _write_safetensors, "hf": _write_hf}


def _chosen_rank(restored: Restored, rank, budget, budget_reference: str, profile_budget):
  """The global rank or profile to export: `rank` itself, the largest rank within `budget`, or
  the saved profile of `profile_budget`."""
  if budget is not None:
    seq_len = config_lib.seq_len(restored.config)
    return flops.rank_for_budget(restored.model, budget, budget_reference, seq_len)
  if profile_budget is not None:
    saved = profiles.saved_profiles(restored.metadata)
    if profile_budget not in saved:
      raise ValueError(
        f"--profile_budget={profile_budget:g}: no saved profile for it; the checkpoint has "
        f"{', '.join(f'{b:g}' for b in saved)}."
      )
    return saved[profile_budget]
  return rank


def _define_flags() -> None:
  """The CLI's flags, defined only when this module runs as a program, so importing `export`
  (e.g. through `nsn.export_model`) adds no flags to the importer's."""
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  flags.DEFINE_string("out", None, "New directory for the exported checkpoint.")
  flags.DEFINE_integer("rank", None, "Global rank to export.")
  flags.DEFINE_float("budget", None, "FLOPs fraction; exports the largest rank that fits.")
  flags.DEFINE_enum(
    "budget_reference", "max_rank", ["max_rank", "dense"], "What --budget is a fraction of."
  )
  flags.DEFINE_float(
    "profile_budget",
    None,
    "Exports the FlexRank profile the checkpoint saved for this budget (config.flexrank.budgets).",
  )
  flags.DEFINE_enum(
    "form",
    "cheapest",
    [*POLICIES, *FORMS],
    "Per-layer form: the cheapest in FLOPs, 'matmul' "
    "(dense or factorised, faster on CPU), or one form for every layer.",
  )
  flags.DEFINE_enum(
    "format",
    "orbax",
    list(FORMATS),
    "orbax checkpoint, safetensors (+ nsn_export.json), or hf: a decoder folded dense in its "
    "Hugging Face layout that transformers loads (needs --form=dense).",
  )
  flags.mark_flags_as_required(["workdir", "out"])


def main():
  f = flags.FLAGS
  metadata = export(
    f.workdir, f.out, f.rank, f.budget, f.budget_reference, f.form, f.profile_budget, f.format
  )
  info = metadata["export"]
  print(format_report([DeployedLayer(**entry) for entry in metadata["deployed"]]))
  if info["profile_budget"] is not None:
    ranks = profiles.summarise(info["rank"])
    what = f"the profile for budget {info['profile_budget']:g} (ranks {ranks})"
  else:
    what = "the dense model" if info["rank"] is None else f"rank {info['rank']}"
  kept = 100 * info["params"] / info["source_params"]
  print(
    f"exported {what} of {info['source']} (step {info['source_step']}) to "
    f"{f.out} ({f.format}): {info['params']:,} parameters ({kept:.1f}% "
    f"of the source's {info['source_params']:,}), {info['flops']:,} FLOPs per example "
    f"({100 * info['flops'] / info['dense_flops']:.1f}% of dense)"
  )


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
