"""Synthetic benchmark data: a word-level tokenizer, random token sequences of controlled lengths, and the
checkpoint both systems load.

Text is ``"w17 w5 w300"``: one whitespace-separated word per token id, so the PyTorch trainers (which tokenize text
themselves) and jrlhf (which receives the ids) see exactly the same tokens. Ids 0-3 are ``<pad>``, ``<bos>``,
``<eos>``, ``<unk>``; words use ids 4 and up. Lengths vary between half and the whole of the budget, and the first
row always has the longest prompt and completion, so both systems pad to the same ``[B, P + N]``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from benchmarks.sizes import BenchSize

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
FIRST_WORD = 4


def build_tokenizer(vocab_size: int):
    """A ``PreTrainedTokenizerFast`` with ``vocab_size`` tokens: the 4 special tokens then ``w4 ... w{V-1}``; no
    BOS is added when encoding."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="right")


def words(ids) -> str:
    """The text of token ids: ``[5, 17] -> "w5 w17"`` (special ids as their token strings)."""
    return " ".join(SPECIAL_TOKENS[i] if i < FIRST_WORD else f"w{i}" for i in ids)


def lengths(rng: np.random.Generator, count: int, longest: int) -> list[int]:
    """``count`` lengths in ``[ceil(longest / 2), longest]``, the first one ``longest``."""
    shortest = max(1, (longest + 1) // 2)
    out = [longest] + [int(x) for x in rng.integers(shortest, longest + 1, size=count - 1)]
    return out[:count]


def random_ids(rng: np.random.Generator, count: int, vocab_size: int) -> list[int]:
    """``count`` word ids (never a special token)."""
    return [int(x) for x in rng.integers(FIRST_WORD, vocab_size, size=count)]


@dataclasses.dataclass
class Sequences:
    """Token-id lists of one benchmark batch (``B`` rows).

    Attributes:
      prompts: ``B`` prompt id lists (no special tokens).
      chosen, rejected: ``B`` completion id lists each ending with EOS (rejected: DPO and reward only).
    """

    prompts: list
    chosen: list
    rejected: list

    def texts(self) -> dict:
        """Text columns for the TRL datasets: ``prompt``, ``chosen``/``completion``, ``rejected`` (completions
        start with a space; the EOS token stays out of the text, the trainers append it)."""
        def body(ids):
            return " " + words(ids[:-1])

        return {"prompt": [words(p) for p in self.prompts], "chosen": [body(c) for c in self.chosen],
                "rejected": [body(r) for r in self.rejected]}


def make_sequences(size: BenchSize, seed: int = 0, rows: int | None = None) -> Sequences:
    """Random prompts and EOS-terminated completions for ``rows`` rows (default ``size.batch_size``): prompt lengths
    in ``[P/2, P]``, completion lengths (EOS included) in ``[N/2, N]``, row 0 the longest of both."""
    rng = np.random.default_rng(seed)
    rows = size.batch_size if rows is None else rows
    vocab = size.hf_config["vocab_size"]
    prompt_lengths = lengths(rng, rows, size.prompt_length)
    prompts = [random_ids(rng, n, vocab) for n in prompt_lengths]
    chosen = [random_ids(rng, n - 1, vocab) + [EOS] for n in lengths(rng, rows, size.completion_length)]
    rejected = [random_ids(rng, n - 1, vocab) + [EOS] for n in lengths(rng, rows, size.completion_length)]
    return Sequences(prompts=prompts, chosen=chosen, rejected=rejected)


def model_config(size: BenchSize):
    """The size's ``jrlhf.models.ModelConfig`` with the benchmark tokenizer's special ids and the compute dtype."""
    from jrlhf.models import ModelConfig

    hf = dict(size.hf_config, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return ModelConfig.from_hf_dict(hf, dtype=size.dtype, param_dtype="float32", remat=size.remat,
                                    scan_unroll=size.scan_unroll)


def write_checkpoint(size: BenchSize, directory: str, seed: int = 0,
                     heads: tuple = ("lm", "lm_value", "score")) -> dict:
    """Initialises the model once with jrlhf and writes the Hugging Face checkpoints both systems load.

    Writes ``directory/lm`` (causal LM + tokenizer), ``directory/lm_value`` (causal LM whose safetensors also hold
    ``score.weight``: PPO's shared value head) and ``directory/score`` (a ``...ForSequenceClassification`` reward
    model), all float32; only those named in ``heads``. Returns ``{name: path}`` for the written ones.
    """
    import jax

    from jrlhf.models import init_model, save_pretrained

    config = model_config(size)
    tokenizer = build_tokenizer(config.vocab_size)
    paths = {}
    for offset, (name, head) in enumerate((("lm", "lm"), ("lm_value", "lm+value"), ("score", "score"))):
        if name not in heads:
            continue
        path = os.path.join(directory, name)
        model, params = init_model(config, jax.random.key(seed + offset), head=head)
        save_pretrained(model, params, path, dtype="float32")
        tokenizer.save_pretrained(path)
        paths[name] = path
        del params
    return paths
