"""Tokenizer (tokenizers + Jinja2 chat templates) and the incremental detokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infinilm_nb.runtime.detokenizer import IncrementalDetokenizer
from infinilm_nb.runtime.tokenizer import Tokenizer
from tests.runtime.hf_models import BOS_ID, CHAT_TEMPLATE, EOS_ID, save_tokenizer

MULTIBYTE = "Héllo 你好 🙂 wörld 🚀🚀 ünïcode!"

# a template in the style of real ones: bos_token, loop variables, raise_exception, a system message
STRICT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "[{{ message['role'] | upper }}] {{ message['content'] | trim }}{% if not loop.last %}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}\n[ASSISTANT]{% endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(directory, 300)
    return directory


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


def test_special_tokens_and_round_trip(tok: Tokenizer):
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (BOS_ID, EOS_ID, 300)
    ids = tok.encode(MULTIBYTE)
    assert tok.decode(ids) == MULTIBYTE
    assert tok.decode([BOS_ID, *ids, EOS_ID]) == MULTIBYTE  # special tokens skipped


def test_add_bos_token_from_config(tok_dir: Path, tmp_path: Path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.encode("Hello")[0] == BOS_ID
    assert tok.encode("Hello", add_special_tokens=False)[0] != BOS_ID


def test_incremental_detokenization_never_splits_a_character(tok: Tokenizer):
    prompt = tok.encode("The capital")
    ids = tok.encode(MULTIBYTE)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces.count("") >= 8  # the multi-byte characters arrive a byte-token at a time
    assert "".join(pieces) == MULTIBYTE == detok.text
    assert detok.flush() == ""


def test_detokenizer_flush_gives_incomplete_tail(tok: Tokenizer):
    ids = tok.encode("ok 🙂")
    detok = IncrementalDetokenizer(tok, [])
    text = "".join(detok.add(i) for i in ids[:-1])  # the emoji's last byte never comes
    assert text == "ok "
    tail = detok.flush()
    assert tail and set(tail) == {"\ufffd"} and detok.text == tok.decode(ids[:-1])


def test_chat_template(tok: Tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages[:1], add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_chat_template_matches_transformers(tok_dir: Path, tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": STRICT_TEMPLATE}))
    ours = Tokenizer.from_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [
        {"role": "user", "content": " What is 你好? "},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "And 🙂?"},
    ]
    want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == want
    assert want.startswith("<|im_start|>[USER] What is 你好?")
    with pytest.raises(ValueError, match="chat template: Conversation roles must alternate"):
        ours.apply_chat_template(messages[1:])


def test_chat_template_from_jinja_file_and_sandbox(tok_dir: Path, tmp_path: Path):
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ValueError, match="chat template: .*unsafe"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_errors(tok_dir: Path, tmp_path: Path, tok: Tokenizer):
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    bare = Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="this model has no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="messages must be a list of"):
        tok.apply_chat_template("hello")
