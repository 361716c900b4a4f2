"""The tokenizer of an HF model directory: ``tokenizers`` on tokenizer.json, Jinja2 chat templates."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as FastTokenizer

Message = dict[str, Any]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(token: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict with "content"."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None) -> str:
    # transformers' tojson: no HTML escaping, non-ASCII kept (Jinja2's own escapes both)
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _find_chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The default chat template: tokenizer_config.json's, else chat_template.jinja / .json."""
    template = tokenizer_config.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template


class Tokenizer:
    """Text <-> token ids for one model, its special tokens and its chat template."""

    def __init__(
        self,
        tokenizer: FastTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else bos_token_id
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else eos_token_id
        # LlamaTokenizer-style configs ask for a BOS the tokenizer.json post-processor may not add
        self._prepend_bos = (
            add_bos_token
            and self.bos_token_id is not None
            and tokenizer.encode("", add_special_tokens=True).ids[:1] != [self.bos_token_id]
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "Tokenizer":
        """Load ``tokenizer.json`` (required) with ``tokenizer_config.json`` and ``config.json`` from a directory."""
        directory = Path(model_dir)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: {path} is missing (the model directory needs tokenizer.json)")
        tokenizer_config = _read_json(directory / "tokenizer_config.json")
        model_config = _read_json(directory / "config.json")

        def first_id(value: Any) -> int | None:
            return value[0] if isinstance(value, list) and value else value

        return cls(
            FastTokenizer.from_file(str(path)),
            bos_token=_token_text(tokenizer_config.get("bos_token")),
            eos_token=_token_text(tokenizer_config.get("eos_token")),
            chat_template=_find_chat_template(directory, tokenizer_config),
            add_bos_token=bool(tokenizer_config.get("add_bos_token", False)),
            bos_token_id=first_id(model_config.get("bos_token_id")),
            eos_token_id=first_id(model_config.get("eos_token_id")),
        )

    @property
    def vocab_size(self) -> int:
        """The number of token ids, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (e.g. a leading BOS)."""
        ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; bytes that do not end a UTF-8 character decode to U+FFFD."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the model's chat template.

        The template runs in a sandboxed Jinja2 environment with ``bos_token``, ``eos_token``,
        ``add_generation_prompt``, ``raise_exception`` and ``strftime_now``, as transformers gives it.
        Tokenize the result with ``add_special_tokens=False``: the template writes the special tokens.
        A template error (e.g. its own ``raise_exception``) is a ``ValueError``.
        """
        if self.chat_template is None:
            raise ValueError(
                "this model has no chat template (no chat_template in tokenizer_config.json, "
                "chat_template.jinja or chat_template.json); use generate() with a plain prompt"
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(
                f"chat: messages must be a list of {{'role': ..., 'content': ...}} dicts, got {messages!r}"
            )
        try:
            return _environment().from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **variables,
            )
        except jinja2.TemplateError as error:
            raise ValueError(f"chat template: {error}") from error


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """The sandboxed Jinja2 environment chat templates run in, with transformers' helpers."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env
