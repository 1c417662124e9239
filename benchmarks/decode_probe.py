"""Per-token decode time of :func:`jrlhf.sampling.generate` on a real checkpoint, by difference.

8 random prompts of ``P`` tokens (the first third padding) x 4 samples = 32 rows, temperature 1, no EOS: the
sampler is timed at 1 and at 33 new tokens (3 calls each, the first compiles); ``(min t(33) - min t(1)) / 32`` is
the time of one decode step of 32 rows. Prints one JSON line::

    python -m benchmarks.decode_probe --model DIR --prompt-length 128
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face folder (e.g. SmolLM2-135M-Instruct)")
    p.add_argument("--prompt-length", type=int, default=128)
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from jrlhf import sampling
    from jrlhf.models import from_pretrained

    P = args.prompt_length
    model, params = from_pretrained(args.model, dtype="float32", param_dtype="float32")
    rng = np.random.default_rng(0)
    ids = rng.integers(100, min(40000, model.config.vocab_size), (8, P)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:, : P // 3] = 0
    res = {}
    for new in (1, 33):
        times = []
        for i in range(3):
            start = time.perf_counter()
            jax.block_until_ready(sampling.generate(model, params, ids, mask, jax.random.key(i), max_new_tokens=new,
                                                    num_samples=4, temperature=1.0, eos_token_id=None))
            times.append(time.perf_counter() - start)
        res[new] = times
    per = (min(res[33]) - min(res[1])) / 32
    print(json.dumps({"prompt_length": P, "t1_s": [round(x, 3) for x in res[1]],
                      "t33_s": [round(x, 3) for x in res[33]], "per_token_s": round(per, 4),
                      "load": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
