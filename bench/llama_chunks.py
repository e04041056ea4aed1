"""One llama-perplexity chunk through llama-cpp-python's batch API (bench_eval.py, qat_experiment.py).

Only the positions >= `first` request logits, as llama-perplexity does; the logits of positions
first .. n-2 (each predicting the next token) come back as float64, with the seconds llama_decode took.
"""
from __future__ import annotations

import time


def decode_chunk(llm, batch, chunk: list[int], first: int):
    import llama_cpp
    import numpy as np

    n = len(chunk)
    llm._ctx.kv_cache_clear()
    batch.n_tokens = n
    for i, t in enumerate(chunk):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i >= first
    t0 = time.perf_counter()
    if llama_cpp.llama_decode(llm._ctx.ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")
    seconds = time.perf_counter() - t0
    V = llm.n_vocab()
    lg = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm._ctx.ctx), shape=((n - first) * V,))
    return lg.reshape(n - first, V)[:n - 1 - first].astype(np.float64), seconds
