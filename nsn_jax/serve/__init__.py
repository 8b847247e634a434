"""A model server for nested models: every rank of one checkpoint over HTTP (docs/serving.md).

`python -m nsn_jax.serve --workdir=DIR`; the pieces: `options` (settings), `engine` (what every
model kind shares: served points, budgets, request checks) with `classify` and `generate` (the
two kinds: compiled programs, requests → results), `policy` (which rank a batch runs at),
`batcher` (queue, dynamic batching, admission), `app` (HTTP API, loading), `metrics`
(Prometheus, structured logs).
"""
