"""Hugging Face decoder checkpoints: parity with transformers per architecture (tiny random
checkpoints and their logits, written once by tests/fixtures/hf/make_fixtures.py; no torch here),
bfloat16 and sharded files, tokenizers and chat templates, clear errors, and a fine-tuning run."""

import json
import pathlib
import shutil
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from configs import smollm2_lm
import nsn_jax as nsn
from nsn_jax.build import check_model_fits
from nsn_jax.config import ConfigError
from nsn_jax.llm import HFTokenizer, load_pretrained, pretrained_kind, render_chat
from nsn_jax.llm.decode import Decoder
from nsn_jax.llm.safetensors_io import SafetensorsFiles, save
from nsn_jax.train_lib import train_and_evaluate

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
ARCHITECTURES = ["llama", "llama3_rope", "llama_sharded", "mistral", "qwen2", "gemma"]
TEMPLATE = (
  "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
  "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
  "{% if add_generation_prompt %}{{ bos_token }}assistant: {% endif %}"
)


def _relative(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def write_char_tokenizer(directory: pathlib.Path, vocab_size: int = 96) -> None:
  """A character-level tokenizer.json (<unk>, <s>, </s>, newline, then characters from ' ') with a
  BOS-adding post-processor, and a tokenizer_config.json with a chat template."""
  specials = ["<unk>", "<s>", "</s>"]
  chars = ["\n"] + [chr(32 + i) for i in range(vocab_size - 4)]
  vocab = {t: i for i, t in enumerate(specials + chars)}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tokenizer.decoder = decoders.Fuse()
  tokenizer.add_special_tokens(specials)
  tokenizer.post_processor = processors.TemplateProcessing(
    single="<s> $A", special_tokens=[("<s>", 1)]
  )
  tokenizer.save(str(directory / "tokenizer.json"))
  settings = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": TEMPLATE}
  (directory / "tokenizer_config.json").write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> pathlib.Path:
  """The llama fixture with a character tokenizer beside it."""
  directory = tmp_path_factory.mktemp("hf") / "llama"
  shutil.copytree(FIXTURES / "llama", directory)
  write_char_tokenizer(directory)
  (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
  return directory


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_logits_match_transformers(name):
  expected = np.load(FIXTURES / name / "expected.npz")
  _, model, _ = load_pretrained(FIXTURES / name)
  logits = np.asarray(model(jnp.asarray(expected["tokens"]))[0])
  assert _relative(logits, expected["logits"]) < 1e-4


def test_the_architectures_differ_where_they_should():
  """What each fixture tests is really there (a loader ignoring it would fail parity)."""
  config = lambda name: load_pretrained(FIXTURES / name)[0]
  assert config("llama3_rope").rope_scaling.kind == "llama3"
  assert config("qwen2").qkv_bias and not config("llama").qkv_bias
  gemma = config("gemma")
  assert gemma.head_dim * gemma.n_heads != gemma.dim and gemma.activation == "gelu_tanh"
  assert config("mistral").max_seq_len == 32  # its sliding window: no longer sequence runs
  assert len(list((FIXTURES / "llama_sharded").glob("*.safetensors"))) > 1


def _write_bf16(source: pathlib.Path, target: pathlib.Path) -> None:
  """The source checkpoint's tensors rounded to bfloat16, as one safetensors file."""
  files, header, blobs, offset = SafetensorsFiles(source), {}, [], 0
  for name in files.names():
    data = files.read(name).astype(ml_dtypes.bfloat16).tobytes()
    header[name] = {"dtype": "BF16", "shape": list(files.shape(name))}
    header[name]["data_offsets"] = [offset, offset + len(data)]
    blobs.append(data)
    offset += len(data)
  raw = json.dumps(header).encode()
  target.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def test_a_bfloat16_checkpoint_loads(tmp_path):
  directory = tmp_path / "bf16"
  directory.mkdir()
  shutil.copy(FIXTURES / "qwen2" / "config.json", directory)
  _write_bf16(FIXTURES / "qwen2", directory / "model.safetensors")
  expected = np.load(FIXTURES / "qwen2" / "expected.npz")
  _, model, _ = load_pretrained(directory)
  logits = np.asarray(model(jnp.asarray(expected["tokens"]))[0])
  assert 1e-5 < _relative(logits, expected["logits"]) < 5e-2  # rounded weights, same model


@pytest.mark.parametrize("name", ["gemma", "qwen2"])
def test_cached_decoding_equals_the_full_forward(name):
  _, model, _ = load_pretrained(FIXTURES / name)
  prompt = [5, 17, 3, 40]
  completion = Decoder(model, slots=16).generate([prompt], 6)[0]
  # Greedy: each new token is the full forward's argmax after the tokens before it.
  logits = model(jnp.asarray([prompt + completion.tokens]))[0][0]
  expected = np.argmax(np.asarray(logits[len(prompt) - 1 : -1]), axis=-1)
  assert completion.tokens == expected.tolist()


def test_tokenizer_and_chat_template(llama_dir):
  _, _, tokenizer = load_pretrained(llama_dir)
  assert isinstance(tokenizer, HFTokenizer)
  assert tokenizer.eos_id == 2 and tokenizer.eos_ids == (2, 5)  # + generation_config.json's
  assert tokenizer.encode("hi") == [1, 4 + ord("h") - 32, 4 + ord("i") - 32]  # BOS added
  assert tokenizer.decode(tokenizer.encode("hi", add_special_tokens=False)) == "hi"
  ids = tokenizer.chat([{"role": "user", "content": "hi"}])
  assert tokenizer.decode(ids) == "<s>user: hi\n<s>assistant: "
  with pytest.raises(ValueError, match="no system role"):
    tokenizer.chat([{"role": "system", "content": "x"}])
  with pytest.raises(ValueError, match="chat message 0"):
    tokenizer.chat(["hi"])
  with pytest.raises(ValueError, match="no chat template"):
    render_chat(None, [{"role": "user", "content": "hi"}])


def _copy_without(tmp_path, tensor):
  directory = tmp_path / "broken"
  shutil.copytree(FIXTURES / "llama", directory)
  files = SafetensorsFiles(directory)
  kept = {n: files.read(n) for n in files.names() if n != tensor}
  save(directory / "model.safetensors", kept)
  return directory


def test_bad_paths_and_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist; expected a GGUF file"):
    pretrained_kind(tmp_path / "nowhere")
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(ValueError, match="notes.txt is not a GGUF file"):
    pretrained_kind(tmp_path / "notes.txt")
  with pytest.raises(ValueError, match="has no config.json"):
    pretrained_kind(tmp_path)
  assert pretrained_kind(FIXTURES / "gemma") == "hf_decoder"
  missing = _copy_without(tmp_path, "model.layers.1.mlp.up_proj.weight")
  with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
    load_pretrained(missing)
  index = FIXTURES / "llama_sharded" / "model.safetensors.index.json"
  broken = tmp_path / "sharded"
  shutil.copytree(FIXTURES / "llama_sharded", broken)
  next(broken.glob("model-00002-*.safetensors")).unlink()
  with pytest.raises(ValueError, match=f"{index.name} lists model-00002"):
    load_pretrained(broken)


@pytest.mark.parametrize(
  "change,match",
  [
    ({"model_type": "gemma2"}, "model_type 'gemma2'; expected"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type is 'yarn'"),
    ({"mlp_bias": True}, "biases on Qwen2's q/k/v only"),
    ({"hidden_act": "relu"}, "hidden_act is 'relu'"),
  ],
)
def test_variants_this_model_does_not_implement_are_refused(tmp_path, change, match):
  directory = tmp_path / "variant"
  shutil.copytree(FIXTURES / "llama", directory)
  config = json.loads((directory / "config.json").read_text()) | change
  (directory / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=match):
    load_pretrained(directory)


def _lm_config(path, data_dir):
  config = smollm2_lm.get_config("smoke")
  config.model.name, config.model.path, config.data.data_dir = "hf_decoder", str(path), data_dir
  config.model.max_rank, config.ranks.fixed, config.eval.ranks = 16, (16, 8, 4), (16, 4)
  return config


def test_a_hugging_face_decoder_fine_tunes_multi_rank_and_restores(llama_dir, data_dir, tmp_path):
  config = _lm_config(llama_dir, data_dir)
  metrics = train_and_evaluate(config, str(tmp_path / "run"))
  assert all(np.isfinite(metrics[f"eval/rank_{r}/loss"]) for r in (16, 4))
  restored = nsn.restore_model(str(tmp_path / "run"))
  assert sorted(nsn.nsn_layers(restored.model))[0] == "layers/0/mlp/down"
  rows = nsn.run_sweep(str(tmp_path / "run"), "4,16", verbose=False)
  assert [row.rank for row in rows] == [4, 16] and rows[0].flops < rows[1].flops
  # Rank 8 folded dense, out in Hugging Face's layout: the library reloads it (and
  # scripts/check_hf_export.py checks it in transformers), with the tokenizer beside it.
  out = tmp_path / "hf8"
  nsn.export_model(str(tmp_path / "run"), str(out), rank=8, form="dense", fmt="hf")
  tokens = jnp.asarray(np.load(out / "hf_check.npz")["tokens"])
  expected = restored.model(tokens, rank=8)[0]
  _, reloaded, tokenizer = load_pretrained(out)
  assert _relative(np.asarray(reloaded(tokens)[0]), np.asarray(expected)) < 1e-5
  assert _relative(np.asarray(nsn.restore_model(str(out)).model(tokens)[0]), expected) < 1e-5
  assert tokenizer.chat([{"role": "user", "content": "hi"}])[0] == 1
  exported = json.loads((out / "config.json").read_text())
  assert exported["model_type"] == "llama" and exported["eos_token_id"] == [2, 5]
  assert json.loads((out / "generation_config.json").read_text())["bos_token_id"] == 1


def test_a_hugging_face_config_pointing_at_the_wrong_thing_is_one_error(data_dir):
  config = _lm_config(FIXTURES / "gemma", data_dir)
  config.model.name = "llama_gguf"
  with pytest.raises(ConfigError, match="holds a hf_decoder model; use model.name=hf_decoder"):
    check_model_fits(config)
  config.model.name, config.model.path = "hf_decoder", ""
  with pytest.raises(ConfigError, match="model.path=''.*Hugging Face decoder directory"):
    nsn.validate(config)
