"""The DPO step on a real checkpoint broken into parts, jrlhf (jax) or a plain PyTorch loop, each in its own process.

Parts (each timed as its own call on the same batch, median of ``--reps`` calls after one untimed call; jax's
compile time is reported apart):

- ``trunk_fwd``: the decoder to the final-normed hidden states, no vocabulary projection;
- ``ref_fwd``: a reference pass: trunk + token log-probs over the vocabulary (no gradient);
- ``vocab_fwd`` / ``vocab_fwd_bwd``: token log-probs from fixed hidden states (the vocabulary projection and the
  log-softmax), forward, and forward + backward to the hidden states and the (tied) embedding (jax: as
  ``--chunk`` says: ``auto`` the loss positions only, an int vocabulary chunks over every position; torch: full
  logits over every position);
- ``policy_fwd_bwd_<remat>``: the gradient of the summed completion log-probs w.r.t. every parameter;
- ``adamw``: one AdamW update of every parameter;
- ``step``: (jax) the library's compiled DPO train step (policy + reference + backward + AdamW).

The batch is ``--rows`` sequences (chosen + rejected) of ``--length`` tokens, every token real, the loss on the
last ``--completion`` tokens of each row (token values do not change the cost)::

    python -m benchmarks.profile_dpo --side jax --model MODEL --parts trunk_fwd,ref_fwd,policy_fwd_bwd_full
    python -m benchmarks.profile_dpo --side torch --model MODEL
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _time(fn, reps: int) -> dict:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"first_s": round(first, 2), "median_s": round(times[len(times) // 2], 2),
            "all_s": [round(t, 2) for t in times], "peak_rss_gb": round(_rss_gb(), 2)}


def _batch_np(rows: int, length: int, completion: int, vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    attn = np.ones((rows, length), np.int32)
    loss = np.zeros((rows, length), np.int32)
    loss[:, length - completion:] = 1
    return ids, attn, loss


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from jrlhf.algorithms import dpo
    from jrlhf.algorithms.base import completion_logps, preference_globals, resolve_chunk_size, selection_tile
    from jrlhf.models import from_pretrained
    from jrlhf.models.logprobs import (selected_token_logprobs, token_logprobs_from_hidden, token_logprobs_from_logits,
                                       unembedding_matrix)

    parts = args.parts.split(",")
    out = {}
    models = {}

    def model_for(remat):
        if remat not in models:
            models[remat] = from_pretrained(args.model, remat=remat)
        return models[remat]

    model, params = model_for("full")
    V = model.config.vocab_size
    ids, attn, loss = (jnp.asarray(a) for a in _batch_np(args.rows, args.length, args.completion, V))
    chunk = resolve_chunk_size(args.chunk, args.rows * (args.length - 1), V)
    out["chunk_size"] = chunk

    def record(name, fn, compile_fn=None):
        if name not in parts:
            return
        res = {}
        if compile_fn is not None:
            start = time.perf_counter()
            compile_fn()
            res["compile_s"] = round(time.perf_counter() - start, 2)
        res.update(_time(fn, args.reps))
        out[name] = res
        print(name, json.dumps(res), flush=True)

    def jitted(f, *a):
        lowered = jax.jit(f).lower(*a)
        holder = {}

        def compile_():
            holder["c"] = lowered.compile()

        def call():
            jax.block_until_ready(holder["c"](*a))

        return call, compile_

    call, comp = jitted(lambda p, i, m: model.apply(p, i, m, return_hidden=True), params, ids, attn)
    record("trunk_fwd", call, comp)

    call, comp = jitted(lambda p, i, m, l: completion_logps(model, p, i, m, l, chunk_size=args.chunk)[0],
                        params, ids, attn, loss)
    record("ref_fwd", call, comp)

    if any(p.startswith("vocab") for p in parts):
        hidden = jax.jit(lambda p, i, m: model.apply(p, i, m, return_hidden=True))(params, ids, attn)[:, :-1]
        emb = unembedding_matrix(model, params)
        targets = ids[:, 1:]
        lmask = loss[:, 1:].astype(jnp.float32)

        def vocab_loss(h, w, targets, lmask):
            if chunk is None:
                lp = token_logprobs_from_logits(jnp.einsum("bth,vh->btv", h, w), targets)
            elif args.chunk == "auto":  # the library's "auto" over the budget: the loss positions only
                lp = selected_token_logprobs(h, w, targets, lmask > 0, selection_tile(V))
            else:
                lp = token_logprobs_from_hidden(h, w, targets, chunk)
            return jnp.sum(lp * lmask)

        call, comp = jitted(vocab_loss, hidden, emb, targets, lmask)
        record("vocab_fwd", call, comp)
        call, comp = jitted(jax.grad(vocab_loss, argnums=(0, 1)), hidden, emb, targets, lmask)
        record("vocab_fwd_bwd", call, comp)
        del hidden

    for remat in ("full", "none", "dots"):
        name = f"policy_fwd_bwd_{remat}"
        if name not in parts:
            continue
        m, p = model_for(remat)

        def policy_loss(p_, i, a, l, m=m):
            return jnp.sum(completion_logps(m, p_, i, a, l, chunk_size=args.chunk)[0])

        call, comp = jitted(jax.grad(policy_loss), p, ids, attn, loss)
        record(name, call, comp)

    if "adamw" in parts:
        opt = optax.adamw(1e-6, weight_decay=0.0)
        state = {"p": params, "o": opt.init(params)}
        grads = jax.tree.map(jnp.ones_like, params)

        def update(p, o, g):
            u, o = opt.update(g, o, p)
            return optax.apply_updates(p, u), o

        f = jax.jit(update)
        start = time.perf_counter()
        compiled = f.lower(state["p"], state["o"], grads).compile()
        c = time.perf_counter() - start

        def call():
            state["p"], state["o"] = compiled(state["p"], state["o"], grads)
            jax.block_until_ready(state["p"])

        res = {"compile_s": round(c, 2), **_time(call, args.reps)}
        out["adamw"] = res
        print("adamw", json.dumps(res), flush=True)

    if "step" in parts:
        from jrlhf.models import logical_axes
        from jrlhf.sharding import make_mesh
        from jrlhf.step import OptimizerConfig, init_train_state, make_optimizer, make_train_step

        mesh = make_mesh()
        specs = logical_axes(model)
        optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-6, max_grad_norm=1.0, weight_decay=0.0),
                                   param_specs=specs)
        st, shardings = init_train_state(params, optimizer, 0, mesh=mesh, param_specs=specs)
        step = make_train_step(dpo.make_loss_fn(model, dpo.Config(beta=0.1, logprob_chunk_size=args.chunk)),
                               optimizer, mesh, state_shardings=shardings, prepare_batch=preference_globals)
        half = args.rows // 2
        batch = {"chosen_input_ids": ids[:half], "rejected_input_ids": ids[half:],
                 "chosen_attention_mask": attn[:half], "rejected_attention_mask": attn[half:],
                 "chosen_loss_mask": loss[:half], "rejected_loss_mask": loss[half:]}
        frozen = dpo.Frozen(ref_params=jax.tree.map(jnp.copy, params))
        holder = {"s": st}

        def call():
            holder["s"], metrics = step(holder["s"], batch, frozen)
            jax.block_until_ready(metrics)

        res = _time(call, args.reps)
        out["step"] = res
        print("step", json.dumps(res), flush=True)
    return out


def run_torch(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    parts = args.parts.split(",")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    V = model.config.vocab_size
    ids, attn, loss = (torch.from_numpy(a).long() for a in _batch_np(args.rows, args.length, args.completion, V))
    out = {"torch_threads": torch.get_num_threads()}

    def logps_from_logits(logits):
        lp = torch.gather(logits[:, :-1].float().log_softmax(-1), 2, ids[:, 1:, None])[..., 0]
        return (lp * loss[:, 1:]).sum(-1)

    def record(name, fn):
        if name not in parts:
            return
        res = _time(fn, args.reps)
        out[name] = res
        print(name, json.dumps(res), flush=True)

    def trunk():
        with torch.no_grad():
            model.model(input_ids=ids, attention_mask=attn).last_hidden_state

    def ref():
        with torch.no_grad():
            logps_from_logits(model(input_ids=ids, attention_mask=attn).logits)

    record("trunk_fwd", trunk)
    record("ref_fwd", ref)
    if any(p.startswith("vocab") for p in parts):
        with torch.no_grad():
            hidden0 = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
        w = model.lm_head.weight

        def vocab_fwd():
            with torch.no_grad():
                logps_from_logits(hidden0 @ w.T)

        def vocab_fwd_bwd():
            h = hidden0.detach().requires_grad_(True)
            logps_from_logits(h @ w.T).sum().backward()
            model.zero_grad(set_to_none=True)

        record("vocab_fwd", vocab_fwd)
        record("vocab_fwd_bwd", vocab_fwd_bwd)
        del hidden0

    for gc in ("full", "none"):
        name = f"policy_fwd_bwd_{gc}"
        if name not in parts:
            continue
        if gc == "full":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        model.train()

        def fb():
            logps_from_logits(model(input_ids=ids, attention_mask=attn).logits).sum().backward()
            model.zero_grad(set_to_none=True)

        record(name, fb)
    if "adamw" in parts:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
        for p in model.parameters():
            p.grad = torch.ones_like(p)

        def step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        record("adamw", step)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="DPO step parts on a real checkpoint, jax or torch")
    p.add_argument("--side", choices=("jax", "torch"), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=int, default=16, help="chosen + rejected sequences")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--completion", type=int, default=128)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--chunk", default="auto", help="jax: algo.logprob_chunk_size (auto, none or an int)")
    p.add_argument("--parts", default="trunk_fwd,ref_fwd,vocab_fwd,vocab_fwd_bwd,policy_fwd_bwd_full,adamw")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.chunk = None if args.chunk == "none" else (args.chunk if args.chunk == "auto" else int(args.chunk))
    result = run_jax(args) if args.side == "jax" else run_torch(args)
    result.update(side=args.side, rows=args.rows, length=args.length, completion=args.completion,
                  load_average=os.getloadavg())
    from benchmarks.recipes_trl import emit

    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
