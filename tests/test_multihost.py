"""Real multi-process training: 2 processes x 2 CPU devices on this machine, collectives through gloo.

The test module doubles as the worker script (``python tests/test_multihost.py --worker MODE PID PORT OUT``). Workers
get their own environment: the parent's 8-device ``XLA_FLAGS`` is replaced by a 2-device one, every wait has a
timeout, and ``jax.distributed`` runs with short initialization / heartbeat timeouts so that a missing or killed peer
ends the run with an error instead of a hang.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 180  # per run, generous for a loaded 2-core machine; a healthy run takes ~20 s
NUM_STEPS = 3
BATCH_SIZE = 8
SEQ_LEN = 12
LR = 0.5
BETA = 0.1
MESH = (1, 4, 1)  # fsdp over the 4 devices of both processes: params and batch split across processes
SMALL = dict(hidden_size=32, intermediate_size=64, head_dim=8, vocab_size=64)


# ------------------------------------------------------------------------------------------- the shared problem


def _problem():
    """Model, params, reference params and the global batches, identical in every process."""
    import jax
    import jrlhf.models as M

    model, params = M.init_model(M.tiny_config("llama", **SMALL), jax.random.PRNGKey(0))
    specs = M.logical_axes(model)
    params = jax.tree.map(np.asarray, params)
    rng = np.random.default_rng(1)
    ref_params = jax.tree.map(lambda x: (x + 0.02 * rng.standard_normal(x.shape)).astype(np.float32), params)
    batches = []
    for seed in range(NUM_STEPS):
        rng = np.random.default_rng(100 + seed)
        batch = {}
        for side in ("chosen", "rejected"):
            ids = rng.integers(1, SMALL["vocab_size"], size=(BATCH_SIZE, SEQ_LEN)).astype(np.int32)
            lengths = rng.integers(SEQ_LEN // 2, SEQ_LEN + 1, size=BATCH_SIZE)
            prompt = rng.integers(2, 5, size=BATCH_SIZE)
            pos = np.arange(SEQ_LEN)[None]
            attention = (pos < lengths[:, None]).astype(np.int32)
            batch[f"{side}_input_ids"] = ids * attention
            batch[f"{side}_attention_mask"] = attention
            batch[f"{side}_loss_mask"] = ((pos >= prompt[:, None]) & (pos < lengths[:, None])).astype(np.int32)
        batches.append(batch)
    return model, params, specs, ref_params, batches


def _dpo_loss_fn(model):
    import jax
    import jax.numpy as jnp
    import jrlhf.losses as L
    import jrlhf.models as M

    def loss_fn(params, batch, frozen, ctx):
        ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        attention = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])[:, 1:]
        seq = jnp.sum(M.model_token_logprobs(model, params, ids, attention) * mask, axis=-1)
        ref = jax.lax.stop_gradient(
            jnp.sum(M.model_token_logprobs(model, frozen["ref_params"], ids, attention) * mask, axis=-1))
        half = batch["chosen_input_ids"].shape[0]
        losses, _, _ = L.dpo_loss(seq[:half], seq[half:], ref[:half], ref[half:], beta=BETA, loss_type="sigmoid")
        return jnp.sum(losses) / ctx.globals["num_sequences"], {}

    return loss_fn


def _train(mesh, on_step=None):
    """3 SGD DPO steps on ``mesh``; returns per-step losses and per-step params (host copies, on every process)."""
    import jax
    from jrlhf import distributed, sharding, step as ST

    model, params, specs, ref_params, batches = _problem()
    opt = ST.make_optimizer(ST.OptimizerConfig(name="sgd", learning_rate=LR, max_grad_norm=None))
    state, shardings = ST.init_train_state(params, opt, jax.random.PRNGKey(0), mesh=mesh, param_specs=specs)
    frozen = {"ref_params": sharding.put_global(ref_params, shardings.params)}
    train_step = ST.make_train_step(_dpo_loss_fn(model), opt, mesh, state_shardings=shardings,
                                    frozen_shardings={"ref_params": shardings.params}, num_microbatches=2)
    rows = distributed.local_batch_rows(mesh, BATCH_SIZE)
    losses, params_per_step = [], []
    for index, batch in enumerate(batches):
        if on_step is not None:
            on_step(index)
        local = {k: v[rows] for k, v in batch.items()}
        state, metrics = train_step(state, distributed.global_batch_from_local(local, mesh), frozen)
        losses.append(float(distributed.process_allgather(metrics["loss"])))
        params_per_step.append(distributed.process_allgather(state.params))
    return losses, params_per_step


# ---------------------------------------------------------------------------------------------------- worker side


def _worker(mode, process_id, port, out_dir):
    from jrlhf import distributed

    init_timeout = 3 if mode == "alone" else 60
    distributed.initialize(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=init_timeout,
                           heartbeat_timeout=5)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from jrlhf import sharding

    assert jax.process_count() == 2 and jax.local_device_count() == 2 and jax.device_count() == 4, jax.devices()
    print(f"worker {process_id}: {jax.local_device_count()} local of {jax.device_count()} devices", flush=True)

    def on_step(index):
        print(f"worker {process_id}: step {index}", flush=True)
        if mode == "kill" and process_id == 1 and index == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    losses, params_per_step = _train(sharding.make_mesh(MESH), on_step)
    if distributed.is_main_process():
        np.savez(Path(out_dir) / "params.npz", **{f"{k}/{i}": v for i, p in enumerate(params_per_step)
                                                  for k, v in _flat(p).items()})
    (Path(out_dir) / f"losses_{process_id}.json").write_text(json.dumps(losses))
    print(f"worker {process_id}: done", flush=True)
    distributed.shutdown()


def _flat(tree):
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------------------------------- parent side


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("JRLHF_") and k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def _run_workers(mode, tmp_path, num_processes=2, timeout=WORKER_TIMEOUT_S):
    """Starts the workers, waits at most ``timeout`` seconds for all of them, returns (return codes, logs)."""
    port = _free_port()
    procs, logs = [], []
    for process_id in range(num_processes):
        log = open(tmp_path / f"worker_{process_id}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-u", __file__, "--worker", mode, str(process_id), str(port), str(tmp_path)],
            stdout=log, stderr=subprocess.STDOUT, env=_child_env(), cwd=str(REPO),
        ))
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
        texts = [(tmp_path / f"worker_{i}.log").read_text()[-3000:] for i in range(num_processes)]
        pytest.fail(f"multi-process run ({mode}) still running after {timeout} s: a hang.\n" + "\n".join(texts))
    finally:
        for log in logs:
            log.close()
    texts = [(tmp_path / f"worker_{i}.log").read_text() for i in range(num_processes)]
    return [proc.returncode for proc in procs], texts


def test_single_process_defaults_and_argument_checks(monkeypatch):
    import jax
    from jrlhf import distributed, sharding

    for name in ("JRLHF_COORDINATOR", "JRLHF_NUM_PROCESSES", "JRLHF_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False  # nothing configured: single process
    assert distributed.is_main_process()
    with pytest.raises(ValueError, match="no coordinator address"):
        distributed.initialize(num_processes=2)
    with pytest.raises(ValueError, match="num_processes and process_id"):
        distributed.initialize("127.0.0.1:1234")
    monkeypatch.setenv("JRLHF_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.setenv("JRLHF_NUM_PROCESSES", "2")
    monkeypatch.setenv("JRLHF_PROCESS_ID", "2")
    with pytest.raises(ValueError, match="process_id=2"):
        distributed.initialize()
    monkeypatch.setenv("JRLHF_PROCESS_ID", "zero")
    with pytest.raises(ValueError, match="JRLHF_PROCESS_ID"):
        distributed.initialize()

    mesh = sharding.make_mesh((2, 2, 2))
    np.testing.assert_array_equal(distributed.local_batch_rows(mesh, 8), np.arange(8))
    batch = distributed.global_batch_from_local({"ids": np.arange(16).reshape(8, 2)}, mesh)
    assert batch["ids"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["ids"]), np.arange(16).reshape(8, 2))


def test_two_processes_match_the_single_process_run(tmp_path):
    import jax

    codes, texts = _run_workers("train", tmp_path)
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    assert "worker 1: 2 local of 4 devices" in texts[1]  # the parent's 8-device XLA_FLAGS did not leak

    from jrlhf import sharding

    mesh = sharding.make_mesh(MESH, devices=jax.devices()[:4])
    ref_losses, ref_params = _train(mesh)
    saved = np.load(tmp_path / "params.npz")
    for process_id in range(2):
        losses = json.loads((tmp_path / f"losses_{process_id}.json").read_text())
        np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5, err_msg=f"process {process_id}")
    for index in range(NUM_STEPS):
        for key, value in _flat(ref_params[index]).items():
            np.testing.assert_allclose(saved[f"{key}/{index}"], value, rtol=0, atol=1e-5,
                                       err_msg=f"{key} after step {index}")
    # The steps did train (the comparison is not between unchanged params).
    _, params, *_ = _problem()
    assert max(np.abs(v - _flat(params)[k]).max() for k, v in _flat(ref_params[-1]).items()) > 1e-3


def test_a_killed_peer_fails_the_run_instead_of_hanging(tmp_path):
    codes, texts = _run_workers("kill", tmp_path)
    assert codes[1] == -signal.SIGKILL, texts[1][-3000:]
    # process 0 trained with its peer before the peer died: the peer reached step 2 only after both had gathered
    # step 1's params, which process 0 does after it prints "step 1" (whether process 0 still prints "step 2" before
    # it notices the dead peer is a race under load)
    assert "worker 0: step 1" in texts[0], texts[0][-3000:]
    assert codes[0] != 0, texts[0][-3000:]
    assert "done" not in texts[0]
    lowered = texts[0].lower()
    # JAX names the cause: a gloo read error from the dead peer, or its missed heartbeats.
    causes = ("heartbeat", "task died", "unhealthy", "connection", "unavailable")
    assert any(cause in lowered for cause in causes), texts[0][-3000:]


def test_a_missing_peer_fails_initialisation_after_the_timeout(tmp_path):
    codes, texts = _run_workers("alone", tmp_path, num_processes=1, timeout=90)
    assert codes[0] != 0, texts[0][-3000:]
    assert "deadline" in texts[0].lower() or "timed out" in texts[0].lower(), texts[0][-3000:]


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
