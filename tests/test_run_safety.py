"""Runs that users break: signals, exceptions, full disks, damaged checkpoints, a second run in the same folder, and
the user mistakes that must be one line. Everything goes through the CLI (``jrlhf.cli.main``): exit status, the
message, no traceback, and what is left on disk.

The interruption chain trains one run directory through every kind of interruption (each resumed from what the
previous one left) and checks the final parameters against an uninterrupted run, bit for bit. Signals are sent by the
process to itself from inside the step it should land in, so each lands exactly where the test says.
"""

import collections
import errno
import glob
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jrlhf import checkpoint, metrics
from jrlhf.data import load_records, write_jsonl

from cli_helpers import assert_one_line_error, run_cli

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "max_position_embeddings": 64}
STEPS = 8


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    write_jsonl(str(path), load_records("builtin:addition/sft_train.jsonl")[:256])
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """Each run of the chain compiles the same step: the persistent cache makes the later ones quick."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for n, v in previous.items():
        jax.config.update(n, v)


def write_config(path, out_dir, train_file, **train):
    cfg = {
        "algorithm": "sft",
        "model": {"family": "llama", "overrides": dict(TINY_MODEL)},
        "data": {"train": train_file, "batch_size": 16, "max_length": 32},
        "optim": {"learning_rate": "3e-3"},  # replaced below by the exponent form users write
        "train": {"output_dir": str(out_dir), "steps": STEPS, "log_every": 1, "progress_bar": False,
                  "tensorboard": False, "save_every": 2, "keep_checkpoints": 3, **train},
    }
    text = yaml.safe_dump(cfg).replace("'3e-3'", "3e-3")
    path.write_text(text)
    return str(path)


def steps_on_disk(run_dir):
    ckpt = os.path.join(run_dir, "checkpoints")
    names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
    assert not [n for n in names if "tmp" in n], names  # no half-written save left behind
    return sorted(int(n) for n in names if n.isdigit())


# --------------------------------------------------------------------------------------- the interruption chain


def test_every_interruption_resumes_to_the_uninterrupted_parameters(tmp_path, sft_file, capsys, monkeypatch):
    reference_cfg = write_config(tmp_path / "ref.yaml", tmp_path / "ref", sft_file)
    assert "learning_rate: 3e-3" in open(reference_cfg).read()  # PyYAML alone reads this as a string
    status, out, err = run_cli(capsys, "--config", reference_cfg)
    assert status == 0, err
    reference = load_file(str(tmp_path / "ref" / "hf_model" / "model.safetensors"))

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", run, sft_file)

    # 0. too little free space: a clear stop at the first save, before anything is written
    real_usage = checkpoint.shutil.disk_usage
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: Usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    status, out, err = run_cli(capsys, "--config", cfg)
    assert_one_line_error(status, err, "not enough free space to save the step 2 checkpoint", "1 MiB are free",
                          "no earlier checkpoint")
    assert steps_on_disk(run) == [] and not (run / "hf_model").exists()
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", real_usage)

    # 1. the run directory is in use by a live process on this host: refused, nothing touched
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = run / checkpoint.LOCK_NAME
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "earlier"}))
        before = sorted(os.listdir(run))
        status, out, err = run_cli(capsys, "--config", cfg)
        assert_one_line_error(status, err, "is in use by another run", f"pid {holder.pid}", str(lock))
        assert sorted(os.listdir(run)) == before
        # ... and by a run on another host (which cannot be checked from here)
        lock.write_text(json.dumps({"pid": 1, "host": "other-host", "started": "earlier"}))
        status, out, err = run_cli(capsys, "--config", cfg)
        assert_one_line_error(status, err, "host other-host")
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "earlier"}))
    finally:
        holder.kill()
        holder.wait()

    # 2. Ctrl-C while the step-2 save is in flight: the save completes, exit 3 ("stopped, saved"); the dead
    #    holder's lock is stale and taken over
    real_save = checkpoint.Checkpointer.save

    def save_then_signal(sig, at_step):
        def save(self, step, *args, **kw):
            started = real_save(self, step, *args, **kw)
            if step == at_step:
                os.kill(os.getpid(), sig)
            return started
        return save

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_signal(signal.SIGINT, 2))
    status, out, err = run_cli(capsys, "--config", cfg)
    assert status == 3, (out, err)
    assert "taking over the stale lock" in out and "[preempted] SIGINT: step 2 is saved" in out
    assert steps_on_disk(run) == [2] and not (run / "hf_model").exists()
    assert not (run / checkpoint.LOCK_NAME).exists()

    # 3. an exception on the step after a save started (step 5, the step-4 save in flight): both saves finish,
    #    the latest completed step is saved too, the error propagates
    monkeypatch.setattr(checkpoint.Checkpointer, "save", real_save)
    real_write = metrics.MetricsWriter.write

    def failing_write(self, step, values, split="train"):
        if step == 5:
            raise RuntimeError("reward function failed")
        return real_write(self, step, values, split)

    monkeypatch.setattr(metrics.MetricsWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="reward function failed"):
        run_cli(capsys, "--config", cfg)
    out = capsys.readouterr().out
    assert "[resume] from step 2" in out and "[saved] step 5" in out
    assert steps_on_disk(run) == [2, 4, 5]
    assert not (run / checkpoint.LOCK_NAME).exists()
    monkeypatch.setattr(metrics.MetricsWriter, "write", real_write)

    # 4. the step-6 save fails (disk full while writing): a clear stop, the last good checkpoint intact
    real_manager_save = checkpoint.ocp.CheckpointManager.save

    def disk_full(self, step, *args, **kw):
        if step == 6:
            os.makedirs(os.path.join(str(self.directory), "6.orbax-checkpoint-tmp-1"), exist_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_manager_save(self, step, *args, **kw)

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", disk_full)
    status, out, err = run_cli(capsys, "--config", cfg)
    assert_one_line_error(status, err, "saving the step 6 checkpoint", "No space left on device",
                          "the last good checkpoint, step 5, is intact", "disk is full")
    assert steps_on_disk(run) == [2, 4, 5] and not (run / "hf_model").exists()
    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", real_manager_save)

    # 5. SIGTERM after the last step (save_every would never save it): the final state is saved before the
    #    evaluation and export, exit 3
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_signal(signal.SIGTERM, STEPS))
    status, out, err = run_cli(capsys, "--config", cfg)
    assert status == 3, (out, err)
    assert f"[preempted] SIGTERM: step {STEPS} is saved" in out
    assert steps_on_disk(run) == [5, 6, STEPS] and not (run / "hf_model").exists()
    monkeypatch.setattr(checkpoint.Checkpointer, "save", real_save)

    # 6. the latest checkpoint is damaged (a data file cut short): the newest complete one is used, the damaged one
    #    moved aside, not deleted
    # (every data file of the step is cut: ocdbt may leave a file whose tail no array references, so cutting only one
    # file does not always damage what a restore reads)
    data_files = glob.glob(str(run / "checkpoints" / str(STEPS) / "state" / "ocdbt.process_0" / "d" / "*"))
    assert data_files
    for name in data_files:
        with open(name, "r+b") as f:
            f.truncate(os.path.getsize(name) // 2)
    status, out, err = run_cli(capsys, "--config", cfg)
    assert status == 0, (out, err)
    assert f"skipped checkpoint step {STEPS}" in out and "using step 6" in out and "[resume] from step 6" in out
    assert (run / "skipped_checkpoints" / str(STEPS) / "state").is_dir()

    final = load_file(str(run / "hf_model" / "model.safetensors"))
    assert sorted(final) == sorted(reference)
    for name in reference:
        assert np.array_equal(final[name], reference[name]), name


def test_run_lock_tells_live_from_stale_owners(tmp_path, capsys):
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now",
          "start_ticks": checkpoint._process_start_ticks(os.getpid())}
    first = checkpoint.RunLock(str(tmp_path)).acquire()
    with pytest.raises(checkpoint.RunLockedError, match=f"pid {os.getpid()} on host"):
        checkpoint.RunLock(str(tmp_path)).acquire()  # a live owner, even this very process
    first.release()
    assert not (tmp_path / checkpoint.LOCK_NAME).exists()
    first.release()  # a second release is a no-op

    lock_file = tmp_path / checkpoint.LOCK_NAME
    if me["start_ticks"] is not None:  # same pid, other start time: the pid was reused by a newer process
        lock_file.write_text(json.dumps(dict(me, start_ticks=me["start_ticks"] - 1)))
        checkpoint.RunLock(str(tmp_path)).acquire().release()
        assert "now belongs to another process" in capsys.readouterr().out
    lock_file.write_text("")  # a half-written lock of a crashed run
    second = checkpoint.RunLock(str(tmp_path)).acquire()
    assert "unreadable or empty" in capsys.readouterr().out
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    second.release()
    assert sorted(os.listdir(tmp_path)) == []  # no temporary or set-aside lock files left
