"""Record sources: JSONL files, the shipped task's files, TensorFlow Datasets and Hugging Face ``datasets``.

A source string picks the reader:

* ``path/to/file.jsonl`` (or ``jsonl:path``): one JSON object per line; blank lines are skipped.
* ``builtin:addition/sft_train.jsonl``: a file shipped in ``jrlhf/data/files/``.
* ``tfds:NAME`` (registered builder, with ``data_dir``) or ``tfds:/path/to/prepared/dir``: read through
  ``tfds.data_source`` / ``tfds.builder_from_directory(dir).as_data_source()`` (array_record files, no
  TensorFlow). Needs ``pip install 'jrlhf[tfds]'``.
* ``hf:/local/file.{json,jsonl,parquet,csv}`` or ``hf:/local/dir`` (``save_to_disk`` output or a folder of data
  files): read through Hugging Face ``datasets``, local files only. Needs ``pip install 'jrlhf[hf]'``.

Every reader returns a list of plain Python dicts (bytes decoded to ``str``, numpy values to Python values).
"""

from __future__ import annotations

import json
import os
from importlib import resources

from jrlhf.errors import JrlhfError


class DataError(JrlhfError, ValueError):
    """A data file or record is invalid; the message names the file/record, the field and the fix."""


def builtin_path(name: str) -> str:
    """Path of a file shipped under ``jrlhf/data/files`` (e.g. ``"addition/sft_train.jsonl"``)."""
    root = str(resources.files("jrlhf.data").joinpath("files"))
    path = os.path.join(root, *name.split("/"))
    if not os.path.isfile(path):
        shipped = sorted(
            os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/")
            for folder, _, files in os.walk(root)
            for f in files
            if f.endswith(".jsonl")
        )
        raise FileNotFoundError(f"no shipped data file 'builtin:{name}'; shipped files: {', '.join(shipped)}")
    return path


class JsonlRecords(list):
    """The records of one JSONL file (a ``list`` of dicts) that remember where each came from.

    ``path``: the file; ``line_numbers[i]``: the 1-based line of record ``i`` (blank lines are skipped, so record
    positions and line numbers can differ). :meth:`where` gives ``"path:line"`` for error messages.
    """

    def __init__(self, records=(), path: str = "", line_numbers=()):
        super().__init__(records)
        self.path = path
        self.line_numbers = list(line_numbers)

    def where(self, index: int) -> str:
        """``"path:line"`` of record ``index`` (0-based position), or ``"record N"`` (1-based) if unknown."""
        if 0 <= index < len(self.line_numbers):
            return f"{self.path}:{self.line_numbers[index]}"
        return f"record {index + 1}"


def read_jsonl(path: str, limit: int | None = None) -> JsonlRecords:
    """Reads a JSONL file: one JSON object per line, blank lines skipped, a UTF-8 byte-order mark ignored.

    Returns:
      :class:`JsonlRecords` (a list of dicts that also knows each record's line number).

    Raises:
      DataError: a line is not UTF-8, not valid JSON or not an object; the message is ``file:line`` and the cause.
      FileNotFoundError: no such file.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"data file '{path}' is a directory; point the data key at a .jsonl file")
    records = JsonlRecords(path=path)
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}:{line_number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                    f"{error.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{line_number}: malformed JSON ({error.msg} at column {error.colno}); each line must be "
                    "one JSON object"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{line_number}: expected a JSON object per line, got {type(record).__name__}"
                )
            records.append(record)
            records.line_numbers.append(line_number)
            if limit is not None and len(records) >= limit:
                break
    return records


def write_jsonl(path: str, records) -> None:
    """Writes ``records`` (dicts) to ``path`` as JSONL, one compact object per line, keys in insertion order. The
    file appears whole or not at all (written to ``path.tmp``, then renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".tmp"
    with open(partial, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
    os.replace(partial, path)


def _to_python(value):
    """bytes -> str, numpy scalars/arrays -> Python values, recursively."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _to_python(value.tolist())
    return value


def _missing_extra(extra: str, source: str, error: ImportError) -> ImportError:
    return ImportError(
        f"reading '{source}' needs the optional '{extra}' extra ({error.name or error} is not installed): "
        f"pip install 'jrlhf[{extra}]'"
    )


def _read_tfds(spec: str, source: str, split: str | None, data_dir: str | None, limit: int | None) -> list[dict]:
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise _missing_extra("tfds", source, error) from error
    if split is None:
        raise DataError(f"'{source}': a tfds source needs a split, e.g. split='train'")
    if os.path.isdir(os.path.expanduser(spec)):
        data_source = tfds.builder_from_directory(os.path.expanduser(spec)).as_data_source(split=split)
    else:
        data_source = tfds.data_source(spec, split=split, data_dir=data_dir, download=False)
    count = len(data_source) if limit is None else min(limit, len(data_source))
    return [_to_python(data_source[i]) for i in range(count)]


def _read_hf(spec: str, source: str, split: str | None, limit: int | None) -> list[dict]:
    try:
        import datasets
    except ImportError as error:
        raise _missing_extra("hf", source, error) from error
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"'{source}': hf sources are local files or folders (jrlhf never downloads); no such path: {path}"
        )
    split = split or "train"
    saved_markers = ("dataset_info.json", "dataset_dict.json")
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in saved_markers):
        dataset = datasets.load_from_disk(path)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(f"'{source}': no split '{split}'; splits: {sorted(dataset)}")
            dataset = dataset[split]
    elif os.path.isdir(path):
        dataset = datasets.load_dataset(path, split=split)
    else:
        extension = os.path.splitext(path)[1].lstrip(".").lower()
        builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "arrow": "arrow"}.get(extension)
        if builder is None:
            raise DataError(f"'{source}': unsupported file type '.{extension}'; use json, jsonl, parquet, csv or arrow")
        dataset = datasets.load_dataset(builder, data_files={split: path}, split=split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [_to_python(row) for row in dataset]


def load_records(source: str, split: str | None = None, *, data_dir: str | None = None, limit: int | None = None,
                 key: str | None = None):
    """Reads a data source into a list of record dicts.

    Args:
      source: ``path.jsonl``, ``jsonl:path``, ``builtin:NAME``, ``tfds:NAME_OR_DIR`` or ``hf:LOCAL_PATH`` (see the
        module docstring).
      split: the split to read (required for tfds, default ``"train"`` for hf, ignored for JSONL).
      data_dir: tfds data directory for a registered builder name.
      limit: read at most this many records.
      key: the config key ``source`` came from (e.g. ``"data.train"``); when given, a source with no records is a
        :class:`DataError` naming the key and the file.

    Returns:
      ``list[dict]``, one dict per record, fields as stored.

    Raises:
      DataError: malformed or non-UTF-8 line (file and line number named), missing split, unsupported file, no
        records where ``key`` is given.
      ImportError: the optional extra for tfds/hf is not installed (the message says which to install).
    """
    if not isinstance(source, str) or not source:
        raise DataError(f"{key or 'data source'} must be a non-empty string, got {source!r}")
    records = _load(source, split, data_dir, limit)
    if key is not None and not records:
        raise DataError(f"{key}: '{source}' holds no records (the file is empty or has only blank lines); point {key} "
                        "at a file with one JSON object per line")
    return records


def _load(source: str, split: str | None, data_dir: str | None, limit: int | None):
    scheme, _, rest = source.partition(":")
    if scheme == "tfds" and rest:
        return _read_tfds(rest, source, split, data_dir, limit)
    if scheme == "hf" and rest:
        return _read_hf(rest, source, split, limit)
    if scheme == "builtin" and rest:
        return read_jsonl(builtin_path(rest), limit)
    if scheme == "jsonl" and rest:
        return read_jsonl(os.path.expanduser(rest), limit)
    path = os.path.expanduser(source)
    if path.endswith((".jsonl", ".json")) or os.path.isfile(path):
        return read_jsonl(path, limit)
    raise DataError(
        f"unknown data source '{source}': use a .jsonl path, 'builtin:NAME', 'tfds:NAME_OR_DIR' or 'hf:LOCAL_PATH'"
    )
