"""Reproductions of the NSN paper's findings, one command each (see docs/results.md).

  python -m nsn_jax.studies.truncation --workdir=runs/studies
  python -m nsn_jax.studies.ablation   --workdir=runs/studies
  python -m nsn_jax.studies.internals  --workdir=runs/studies

Each takes `--config=FILE[:arg]` (default configs/default.py) and `--config.a.b=v` overrides,
like train.py. Runs share `--workdir`: a variant already trained there is reused.
"""
