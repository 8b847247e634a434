"""Tokenizers of Hugging Face model directories, and chat templates rendered into prompts.

`HFTokenizer` wraps tokenizer.json (the `tokenizers` library) with what tokenizer_config.json
adds: the BOS / EOS tokens and the chat template. `render_chat` renders any model's Jinja chat
template (also a GGUF file's `tokenizer.chat_template`) the way transformers'
`apply_chat_template` does: a sandboxed environment, trim_blocks and lstrip_blocks, the
`loopcontrols` extension and `raise_exception`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import datetime
import functools
import json
import os
import pathlib
from typing import Any

import jinja2
from jinja2 import sandbox
import tokenizers

Message = Mapping[str, Any]  # {"role": "user" | "assistant" | "system", "content": str}


def _raise(message: str):
  raise ValueError(f"chat template: {message}")


@functools.lru_cache(maxsize=16)
def _template(source: str) -> jinja2.Template:
  env = sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
  )
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)


def render_chat(
  template: str | None,
  messages: Sequence[Message],
  *,
  add_generation_prompt: bool = True,
  **special_tokens: str | None,
) -> str:
  """The prompt text of `messages` under a Jinja chat `template` (bos_token=..., eos_token=...
  are passed to it). Raises ValueError if the model has no template, a message is not a
  {role, content} mapping, or the template refuses the conversation."""
  if not template:
    raise ValueError("this model has no chat template; give a plain prompt instead.")
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
      raise ValueError(
        f"chat message {i} is {message!r}; expected {{'role': ..., 'content': ...}}."
      )
  try:
    return _template(template).render(
      messages=list(messages), add_generation_prompt=add_generation_prompt, **special_tokens
    )
  except jinja2.TemplateError as e:
    raise ValueError(f"chat template failed: {e}") from None


def save_tokenizer(
  tokenizer: tokenizers.Tokenizer,
  directory: str | os.PathLike,
  bos_token: str | None,
  eos_token: str | None,
  chat_template: str | None,
) -> None:
  """Writes tokenizer.json and a tokenizer_config.json naming the special tokens and template."""
  directory = pathlib.Path(directory)
  tokenizer.save(str(directory / "tokenizer.json"))
  settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos_token}
  settings |= {"eos_token": eos_token, "chat_template": chat_template}
  (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


def _token(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  return value.get("content") if isinstance(value, Mapping) else value


class HFTokenizer:
  """tokenizer.json + tokenizer_config.json of a Hugging Face directory.

  `encode(text)` adds what the tokenizer's post-processor adds (e.g. Llama's BOS), as
  transformers' `tokenizer(text)` does; `chat(messages)` renders the chat template, whose text
  already holds its special tokens.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, settings: Mapping[str, Any]):
    self._tok = tokenizer
    self._tok.no_padding()
    self._tok.no_truncation()
    self.bos_token, self.eos_token = (
      _token(settings.get("bos_token")),
      _token(settings.get("eos_token")),
    )
    self.bos_id = None if self.bos_token is None else tokenizer.token_to_id(self.bos_token)
    self.eos_id = None if self.eos_token is None else tokenizer.token_to_id(self.eos_token)
    # Every id that ends a turn: the EOS token and generation_config.json's eos_token_id
    # (Llama-3 and Gemma-it list several, e.g. Gemma's <end_of_turn>).
    extra = settings.get("generation_eos_ids", ())
    self.eos_ids = tuple(dict.fromkeys(i for i in (self.eos_id, *extra) if i is not None))
    template = settings.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      template = {t.get("name"): t.get("template") for t in template}.get("default")
    self.chat_template: str | None = template

  @classmethod
  def from_directory(cls, directory: str | os.PathLike) -> HFTokenizer:
    directory = pathlib.Path(directory)
    settings_path = directory / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    generation = directory / "generation_config.json"
    if generation.is_file():
      eos = json.loads(generation.read_text()).get("eos_token_id")
      settings["generation_eos_ids"] = [eos] if isinstance(eos, int) else list(eos or ())
    template_path = directory / "chat_template.jinja"  # newer transformers save it apart
    if template_path.is_file() and not settings.get("chat_template"):
      settings["chat_template"] = template_path.read_text()
    try:
      tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
      raise ValueError(f"{directory / 'tokenizer.json'} is not a tokenizer file: {e}") from None
    return cls(tokenizer, settings)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int]) -> str:
    """The text of token ids (special tokens included)."""
    return self._tok.decode(list(ids), skip_special_tokens=False)

  def save(self, directory: str | os.PathLike) -> None:
    """tokenizer.json and tokenizer_config.json, as `from_directory` (and transformers) read."""
    save_tokenizer(self._tok, directory, self.bos_token, self.eos_token, self.chat_template)

  def chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered by the chat template (no tokens added beyond it)."""
    text = render_chat(
      self.chat_template,
      messages,
      add_generation_prompt=add_generation_prompt,
      bos_token=self.bos_token,
      eos_token=self.eos_token,
    )
    return self.encode(text, add_special_tokens=False)
