"""Tokenizers: the shipped character-level tokenizer and a loader that checks what jrlhf needs.

The shipped tokenizer (``jrlhf/data/files/char_tokenizer/``) is a Hugging Face fast tokenizer with one token per
character: 7 special tokens (ids 0-6: ``<|pad|>``, ``<|bos|>``, ``<|eos|>``, ``<|unk|>``, ``<|system|>``,
``<|user|>``, ``<|assistant|>``), then newline, tab and the 95 printable ASCII characters (104 tokens in all).
Encoding with special tokens prepends ``<|bos|>``; any other character maps to ``<|unk|>``. Its chat template is::

    <|bos|><|user|>{content}<|eos|><|assistant|>{content}<|eos|>...

with ``<|assistant|>`` appended when ``add_generation_prompt=True``, so an assistant turn ends with EOS, which is
the token generation stops at. ``transformers.AutoTokenizer.from_pretrained`` loads the folder offline.

Padding policy: jrlhf never guesses a pad token. :func:`load_tokenizer` raises a :class:`TokenizerError` for a
tokenizer without one unless ``pad_token`` is given (``pad_token="eos"`` reuses EOS, which is safe here because
every mask is built from lengths, never from ``ids != pad_id``).
"""

from __future__ import annotations

import os
from importlib import resources

from jrlhf.errors import JrlhfError

CHAR_TOKENIZER_NAME = "char"
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class TokenizerError(JrlhfError, ValueError):
    """A tokenizer lacks something jrlhf needs (pad or EOS token, chat template); the message says the fix."""


def char_tokenizer_dir() -> str:
    """Path of the shipped character-level tokenizer folder (``tokenizer.json``, ``tokenizer_config.json``)."""
    return str(resources.files("jrlhf.data").joinpath("files", "char_tokenizer"))


def build_char_tokenizer():
    """Builds the character-level tokenizer in memory.

    Returns:
      A ``transformers.PreTrainedTokenizerFast`` with pad id 0, bos id 1, eos id 2, unk id 3 and a vocabulary of
      104 tokens (special tokens, ``\\n``, ``\\t`` and printable ASCII 32-126), with :data:`CHAT_TEMPLATE`.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    characters = ["\n", "\t"] + [chr(code) for code in range(32, 127)]
    vocab = {token: index for index, token in enumerate(list(SPECIAL_TOKENS) + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", vocab["<|bos|>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def save_char_tokenizer(directory: str | None = None) -> str:
    """Writes the character-level tokenizer's Hugging Face files into ``directory`` (default: the shipped folder).

    Returns:
      The directory written.
    """
    import json

    directory = directory or char_tokenizer_dir()
    os.makedirs(directory, exist_ok=True)
    build_char_tokenizer().save_pretrained(directory)
    # Name the generic fast class so that any transformers version loads the files.
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return directory


def check_tokenizer(tokenizer, *, need_eos: bool = True) -> None:
    """Raises :class:`TokenizerError` unless ``tokenizer`` has a pad token (and an EOS token when ``need_eos``)."""
    if tokenizer.pad_token_id is None:
        raise TokenizerError(
            "tokenizer has no pad token: load it with jrlhf.data.load_tokenizer(path, pad_token='eos') or set "
            "tokenizer.pad_token = tokenizer.eos_token (pad may equal EOS: jrlhf builds masks from lengths)"
        )
    if need_eos and tokenizer.eos_token_id is None:
        raise TokenizerError(
            "tokenizer has no EOS token: set tokenizer.eos_token (completions end with EOS so that the model "
            "learns to stop)"
        )


def load_tokenizer(path_or_name: str | None = CHAR_TOKENIZER_NAME, *, pad_token: str | None = None):
    """Loads a Hugging Face tokenizer from a local folder, or the shipped character tokenizer.

    A training run picks its tokenizer with :func:`jrlhf.train_loop.resolve_tokenizer` (the model's own by default).

    Args:
      path_or_name: ``"char"`` (or ``None``) for the shipped character-level tokenizer, or a local folder with
        Hugging Face tokenizer files (nothing is downloaded).
      pad_token: used only when the tokenizer has no pad token: ``"eos"`` reuses the EOS token, any other string is
        set as the pad token (added to the vocabulary if new, which
        then needs a larger embedding). ``None`` (default) makes a tokenizer without a pad
        token an error.

    Returns:
      The ``transformers`` tokenizer, checked by :func:`check_tokenizer`.

    Raises:
      TokenizerError: no pad token and ``pad_token`` not given, or no EOS token.
      FileNotFoundError: the folder does not exist.
    """
    from transformers import AutoTokenizer

    if path_or_name is None or path_or_name == CHAR_TOKENIZER_NAME:
        path = char_tokenizer_dir()
    else:
        path = os.path.expanduser(path_or_name)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"tokenizer '{path_or_name}' is not a local folder: pass 'char' for the shipped tokenizer or a "
                "folder with tokenizer.json / tokenizer_config.json (jrlhf never downloads)"
            )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None and pad_token is not None:
        if pad_token == "eos":
            if tokenizer.eos_token is None:
                raise TokenizerError(f"tokenizer '{path_or_name}' has no EOS token to use as pad_token='eos'")
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": pad_token})
    check_tokenizer(tokenizer)
    return tokenizer
