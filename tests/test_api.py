"""The public API: `import nsn_jax as nsn` names, and docs/api.md's examples run as doctests."""

import doctest
import os
import subprocess
import sys

import nsn_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_public_name_resolves():
  for name in nsn_jax.__all__:
    assert getattr(nsn_jax, name) is not None, name
  assert set(nsn_jax.__all__) <= set(dir(nsn_jax))


def test_importing_the_package_loads_no_jax():
  """`import nsn_jax` stays cheap: the API's modules load on first use."""
  code = "import sys, nsn_jax; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_deploy_and_export_keep_their_names_when_the_submodules_load():
  # Importing a submodule binds it on the package, under the same name.
  import nsn_jax.deploy
  import nsn_jax.export

  assert callable(nsn_jax.deploy_model) and callable(nsn_jax.export_model)


def test_docs_api_examples_run():
  failures, tried = doctest.testfile(
    os.path.join(REPO, "docs", "api.md"),
    module_relative=False,
    optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
  )
  assert tried > 10 and failures == 0
