"""A GGUF file's tokenizer as HF ``tokenizer.json`` and ``tokenizer_config.json``.

A GGUF stores a byte-level BPE tokenizer as its vocabulary (already spelled in the byte-level
alphabet, e.g. ``Ġthe``), its merges, a type per token and a ``tokenizer.ggml.pre`` name for the
text splitting its merges were learned with. The split is not stored, so each supported name maps to
the pre-tokenizer of the original ``tokenizer.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# The split regex of Llama 3's tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def _smollm() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


def _llama3() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> (pre-tokenizer, ignore_merges: whole-word vocabulary hits skip the merges)
PRE_TOKENIZERS: dict[str, tuple[Callable[[], pre_tokenizers.PreTokenizer], bool]] = {
    "default": (_gpt2, False),
    "gpt-2": (_gpt2, False),
    "smollm": (_smollm, False),
    "llama-bpe": (_llama3, True),
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def build_tokenizer(get: Callable[[str], Any], model_max_length: int) -> tuple[Tokenizer, dict]:
    """``(tokenizer, tokenizer_config)`` from GGUF metadata; ``get(key)`` returns a value or None.

    Raises ValueError naming a tokenizer model other than byte-level BPE (``gpt2``) or an unknown
    ``tokenizer.ggml.pre``.
    """
    kind = get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported tokenizer model {kind!r} (supported: 'gpt2', byte-level BPE)")
    pre = get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"unsupported tokenizer pre-tokenizer {pre!r} (supported: {', '.join(PRE_TOKENIZERS)})")
    make_pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]

    tokens: list[str] = get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise ValueError("the GGUF file has no tokenizer.ggml.tokens vocabulary")
    token_types: list[int] = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(merge.split(" ", 1)) for merge in get("tokenizer.ggml.merges") or ()]
    vocab = {token: index for index, token in enumerate(tokens)}
    try:
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    except Exception as error:  # tokenizers raises a bare Exception
        raise ValueError(f"the GGUF vocabulary and merges do not form a BPE tokenizer: {error}") from error
    tokenizer.pre_tokenizer = make_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()

    special = [tokens[i] for i, token_type in enumerate(token_types) if token_type == _CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user_defined = [tokens[i] for i, token_type in enumerate(token_types) if token_type == _USER_DEFINED]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

    def token(key: str) -> str | None:
        index = get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[int(index)]

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(get("tokenizer.ggml.add_bos_token")) and bos is not None
    add_eos = bool(get("tokenizer.ggml.add_eos_token")) and eos is not None
    if add_bos or add_eos:

        def template(sequence: str, type_id: int) -> str:
            parts = [f"{bos}:{type_id}"] if add_bos else []
            parts.append(f"${sequence}:{type_id}")
            return " ".join(parts + ([f"{eos}:{type_id}"] if add_eos else []))

        ends = {t: vocab[t] for t, on in ((bos, add_bos), (eos, add_eos)) if on}
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template("A", 0), pair=f"{template('A', 0)} {template('B', 1)}", special_tokens=list(ends.items())
        )

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "additional_special_tokens": special,
        "added_tokens_decoder": {
            str(vocab[t]): {"content": t, "special": t in special, "normalized": False,
                            "lstrip": False, "rstrip": False, "single_word": False}
            for t in special + user_defined
        },
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    chat_template = get("tokenizer.chat_template")
    if chat_template is not None:
        config["chat_template"] = chat_template
    return tokenizer, config
