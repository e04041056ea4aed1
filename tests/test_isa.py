"""Kernel variants chosen at run time (gemmalab.quant.kernels.isa) and the kernels' thread pool.

Every exact variant this CPU supports (kernels.EXACT_ISAS: the AVX-512 VNNI kernels do the same
exact integer sums and the same fp32 operations in the same order as AVX2) must give bit-identical
outputs to the AVX2 baseline, for every weight type, at every activation tile size (1-8 rows, 8+
rows, an odd block at the end), for the fused decode step of a real model, and whatever the number
of threads or the pool in use. The AMX variant scales whole-block integer sums (one fp32 rounding
per block instead of 8 lanes): it must stay within a stated fp32 rounding bound of AVX2, give a row
the same bits alone or in a batch, and match AVX2's quality on the real model.
On a CPU without AVX-512 (or AMX) only the variants it has run, and asking for another one is a
clear error.
"""
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from gemmalab import cpu
from gemmalab.quant import kernels
from gemmalab.quant.linear import prepare_blocks

ops = kernels.ops()
VARIANTS = kernels.supported_isas()
TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K]


@pytest.fixture
def restore_isa():
    before = kernels.isa()
    yield
    kernels.set_isa(before)


def blocks_of(qtype, rows, cols, seed):
    rng = np.random.default_rng(seed)
    if qtype in (T.Q4_K, T.Q6_K):  # gguf.quants cannot quantize to these: random codes and scales
        nb, size = (144, (0, 2)) if qtype == T.Q4_K else (210, (208,))
        raw = rng.integers(0, 256, (rows, cols // 256, nb), dtype=np.uint8)
        for off in size:  # sane fp16 super-block scales (d, dmin)
            raw[:, :, off:off + 2] = (rng.uniform(0.01, 0.1, (rows, cols // 256)).astype(np.float16)
                                      .view(np.uint8).reshape(rows, cols // 256, 2))
        raw = torch.from_numpy(raw.reshape(rows, -1).copy())
    else:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        q = gguf.quants.quantize(w, qtype)
        raw = torch.from_numpy(np.ascontiguousarray(q)).view(torch.uint8).reshape(rows, -1)
    return prepare_blocks(raw, int(qtype), cols)


def with_variant(name, fn):
    kernels.set_isa(name)
    return fn()


def q8_0_with_min_codes(rows, cols, seed):
    """Q8_0 blocks holding -128 codes (which llama.cpp never writes): the kernels' Q8_0 type, not
    Q8_0_SYM."""
    raw = blocks_of(T.Q8_0, rows, cols, seed)[0].clone().view(rows, cols // 32, 34)
    raw[:, ::3, 2 + seed % 32] = 0x80
    blocks, ktype = prepare_blocks(raw.reshape(rows, -1), int(T.Q8_0), cols)
    assert ktype == int(T.Q8_0)
    return blocks, ktype


def amx_bound(x, blocks, ktype, cols):
    """Elementwise bound on |amx - avx2|: both compute the same exact integer block sums and then
    sum nb = cols/32 scaled terms in fp32, in different orders (avx2: 8 lanes per block in two
    chains of nb/2, then a horizontal sum; amx: one chain of nb), each term also rounded by its
    scale product. Each result is then within (nb + 10) roundings of 2^-24 of the exact sum,
    relative to the sum of the terms' magnitudes, |W| @ |xq| (W dequantized, xq the 8-bit
    activations) (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 4.4)."""
    W = ops.dequantize(blocks, ktype, cols)
    return 2 * (cols // 32 + 10) * 2.0 ** -24 * (ops.quantize_act(x).abs() @ W.abs().t())


def test_variant_choice_follows_the_cpu():
    assert VARIANTS[0] == "avx2"
    assert ("avx512" in VARIANTS) == cpu.avx512_supported()
    assert ("amx" in VARIANTS) == cpu.amx_supported()
    # without GEMMALAB_ISA the best variant is chosen
    out = subprocess.run([sys.executable, "-c", "from gemmalab.quant import kernels; print(kernels.isa())"],
                         capture_output=True, text=True, env={**os.environ, "GEMMALAB_ISA": ""})
    assert out.stdout.strip() == VARIANTS[-1], out.stderr


@pytest.mark.parametrize("name", kernels.ISAS)
def test_override_selects_the_variant_or_refuses_it(name, restore_isa):
    env = {**os.environ, "GEMMALAB_ISA": name}
    out = subprocess.run([sys.executable, "-c", "from gemmalab.quant import kernels; print(kernels.isa())"],
                         capture_output=True, text=True, env=env)
    if name in VARIANTS:
        assert out.returncode == 0 and out.stdout.strip() == name, out.stderr
        kernels.set_isa(name)
        assert kernels.isa() == name
    else:  # e.g. avx512 on an AVX2-only CPU: one clear error naming what is missing
        assert out.returncode != 0 and f"cannot run the {name} kernels" in out.stderr
        with pytest.raises(ValueError, match="lacks"):
            kernels.set_isa(name)
    with pytest.raises(ValueError, match="unknown kernel variant"):
        kernels.set_isa("sse2")


def test_refusals_name_what_is_missing(restore_isa, monkeypatch):
    """Without the AMX flags, or without the kernel's permission, "amx" is not offered and asking
    for it is one clear error (checked here on any CPU through a patched flag set)."""
    no_amx = frozenset(f for f in cpu.cpu_flags() if not f.startswith("amx")) | set(cpu.AVX512_NEEDS)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: no_amx)
    assert "amx" not in kernels.supported_isas()
    with pytest.raises(ValueError, match="cannot run the amx kernels .it lacks amx_tile, amx_int8"):
        kernels.set_isa("amx")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: no_amx | {"amx_tile", "amx_int8"})
    monkeypatch.setattr(cpu, "amx_permission", lambda: "the Linux kernel refused the AMX tile data state")
    assert "amx" not in kernels.supported_isas()
    with pytest.raises(ValueError, match="lacks permission to use them: the Linux kernel refused"):
        kernels.set_isa("amx")


def variant_outputs(x, blocks, ktype):
    return {v: with_variant(v, lambda: ops.qlinear(x, blocks, ktype)) for v in VARIANTS}


def check_against_avx2(outs, x, blocks, ktype, cols, what):
    for v, y in outs.items():
        if v in kernels.EXACT_ISAS:
            assert torch.equal(y, outs["avx2"]), (what, v, (y - outs["avx2"]).abs().max())
        else:
            diff = (y - outs["avx2"]).abs()
            assert (diff <= amx_bound(x, blocks, ktype, cols)).all(), (what, v, diff.max())
            # observed max |amx - avx2| / max |avx2| over these cases: 3.1e-7
            assert diff.max() <= 2e-6 * outs["avx2"].abs().max(), (what, v, diff.max())


@pytest.mark.parametrize("qtype", TYPES + ["Q8_0_MIN"], ids=lambda t: getattr(t, "name", t))
def test_variants_agree_per_weight_type(qtype, restore_isa):
    cols = 512 if qtype in (T.Q4_K, T.Q6_K) else 480  # 480 = 15 blocks of 32: an odd last block
    if qtype == "Q8_0_MIN":
        blocks, ktype = q8_0_with_min_codes(37, cols, seed=7)
    else:
        blocks, ktype = blocks_of(qtype, 37, cols, seed=int(qtype))
    g = torch.Generator().manual_seed(3)
    for M in (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 32):
        x = torch.randn(M, cols, generator=g) * 3
        outs = variant_outputs(x, blocks, ktype)
        check_against_avx2(outs, x, blocks, ktype, cols, (qtype, M))
        if "amx" in VARIANTS and M in (3, 17):  # a row's bits do not depend on its batch
            kernels.set_isa("amx")
            alone = torch.cat([ops.qlinear(x[i:i + 1], blocks, ktype) for i in range(M)])
            assert torch.equal(alone, outs["amx"]), (qtype, M)
    # several matrices sharing one input, as the fused step calls them
    x = torch.randn(6, cols, generator=g)
    b2, k2 = blocks_of(qtype if qtype != "Q8_0_MIN" else T.Q8_0, 20, cols, seed=99)
    multi = {v: with_variant(v, lambda: ops.qlinear_multi(x, [blocks, b2], [ktype, k2])) for v in VARIANTS}
    for v in VARIANTS:
        assert torch.equal(multi[v][0], with_variant(v, lambda: ops.qlinear(x, blocks, ktype)))
        assert torch.equal(multi[v][1], with_variant(v, lambda: ops.qlinear(x, b2, k2)))
        if v in kernels.EXACT_ISAS:
            assert all(torch.equal(a, b) for a, b in zip(multi[v], multi["avx2"]))


@pytest.mark.skipif("amx" not in VARIANTS, reason="this CPU has no AMX (or the kernel refuses it)")
def test_amx_tiles_at_the_edges_of_the_matrix(restore_isa):
    """Row counts around the 16-row tiles (the last tile of a matrix is padded), activation tiles of
    1-16 rows and a 16 + 16 + 1 split, the LM head's width (20 blocks), the Q5_0_U8 offsets."""
    g = torch.Generator().manual_seed(8)
    for qtype in (T.Q8_0, T.Q5_0):
        for rows in (1, 15, 16, 17, 33, 250):
            blocks, ktype = blocks_of(qtype, rows, 640, seed=rows)
            for M in (1, 6, 11, 16, 33):
                x = torch.randn(M, 640, generator=g)
                outs = variant_outputs(x, blocks, ktype)
                check_against_avx2(outs, x, blocks, ktype, 640, (qtype.name, rows, M))


def test_variants_differ_from_the_reference_only_by_activation_rounding(restore_isa):
    # an independent check that neither variant is wrong in the same way: dequantized weights
    # times the 8-bit activations, within fp32 summation error
    for qtype in (T.Q4_K, T.Q6_K, T.Q8_0, T.Q5_0):
        blocks, ktype = blocks_of(qtype, 40, 768 if qtype == T.Q8_0 else 512, seed=5)
        K = 768 if qtype == T.Q8_0 else 512
        W = ops.dequantize(blocks, ktype, K)
        x = torch.randn(8, K)
        ref = ops.quantize_act(x) @ W.t()
        for v in VARIANTS:
            y = with_variant(v, lambda: ops.qlinear(x, blocks, ktype))
            assert (y - ref).abs().max() <= 2e-6 * ref.abs().max() * K ** 0.5, (qtype.name, v)


@pytest.mark.slow
def test_real_model_decode_across_variants_and_threads(model_path, restore_isa):
    """The exact variants give the fused decode of the real 270M bit for bit, at 1 and 2 threads;
    the AMX variant gives its own bits at any thread count (its quality: the next test)."""
    import gemmalab
    lm = gemmalab.load(model_path, mode="native")
    prompts = ["def fibonacci(n):", "The capital of France is", "Once upon a time"]
    ids = [lm.tokenizer.encode(p, add_bos=True) for p in prompts]
    outs = {}
    threads = torch.get_num_threads()
    try:
        for v in VARIANTS:
            for nt in sorted({1, threads}):
                torch.set_num_threads(nt)
                kernels.set_isa(v)
                out = lm.generate([lm.tokenizer.decode(i[1:]) for i in ids], max_new_tokens=24,
                                  temperature=0)
                cache = lm.model.make_cache(1, 64)
                logits = torch.cat([lm.model.decode_step(torch.tensor([t]), torch.tensor([i]), cache)
                                    for i, t in enumerate(ids[0])])
                outs[(v, nt)] = ([o.token_ids for o in out], logits)
    finally:
        torch.set_num_threads(threads)
    for (v, nt), (toks, logits) in outs.items():
        base = outs[("avx2" if v in kernels.EXACT_ISAS else v, threads)]
        assert toks == base[0], (v, nt)
        assert torch.equal(logits, base[1]), (v, nt)


@pytest.mark.slow
@pytest.mark.skipif("amx" not in VARIANTS, reason="this CPU has no AMX (or the kernel refuses it)")
def test_real_model_amx_quality_matches_avx2(lm, model_path, restore_isa):
    """Teacher-forced decode of 160 tokens of code, AMX and AVX2 against the fp32 model.

    Per product the variants differ by ~1e-7 (relative); but every layer re-quantizes its input to
    8 bits per block of 32, so such a difference sometimes moves a code across a rounding boundary
    (a step of 1/127 of the block's largest value), and over 18 layers those flips add up: the two
    variants' logits are about as far apart as each is from fp32 (measured on 200 tokens: max
    |logit difference| 1.7, mean 0.12; argmax agreement 97%; KL to fp32 0.0035 avx2, 0.0034 amx;
    greedy continuations of 6 prompts x 48 tokens: 4 identical, 2 parting after 4 and 35 tokens).
    Bit-identity with AVX2 is not possible for a kernel that rounds once per block, so the check is
    that AMX is as good as AVX2: KL to fp32 within 1.5x AVX2's + 0.001, top-1 within 2 points."""
    import gemmalab
    from pathlib import Path
    native = gemmalab.load(model_path, mode="native")
    text = Path(kernels.__file__).read_text()
    ids = native.tokenizer.encode(text, add_bos=True)[:160]
    with torch.inference_mode():
        ref = torch.log_softmax(lm.logits(ids), -1)
    res = {}
    for v in ("avx2", "amx"):
        kernels.set_isa(v)
        cache = native.model.make_cache(1, len(ids))
        with torch.inference_mode():
            logits = torch.cat([native.model.decode_step(torch.tensor([t]), torch.tensor([i]), cache)
                                for i, t in enumerate(ids)])
        lp = torch.log_softmax(logits, -1)
        res[v] = ((ref.exp() * (ref - lp)).sum(-1).mean().item(),
                  (lp.argmax(-1) == ref.argmax(-1)).float().mean().item())
        print(f"{v}: KL to fp32 {res[v][0]:.5f}, top-1 {res[v][1]:.4f}")
    assert res["amx"][0] <= 1.5 * res["avx2"][0] + 0.001, res
    assert res["amx"][1] >= res["avx2"][1] - 0.02, res


def test_pool_spreads_work_and_static_slices_agree(restore_isa):
    blocks, ktype = blocks_of(T.Q8_0, 4096, 256, seed=1)
    x = torch.randn(2, 256)
    ref = ops.qlinear(x, blocks, ktype)
    kernels.reset_pool_stats()
    for _ in range(5):
        assert torch.equal(ops.qlinear(x, blocks, ktype), ref)
    st = kernels.pool_stats()
    assert st["pool"] == "guided" and st["jobs"] >= 5
    if torch.get_num_threads() > 1:
        assert st["parallel_jobs"] + st["solo_jobs"] >= 5
    # static slices (GEMMALAB_POOL=static, at::parallel_for) compute the same numbers
    code = ("import torch, sys; from gemmalab.quant import kernels; from tests.test_isa import blocks_of; "
            "from gguf import GGMLQuantizationType as T; b, k = blocks_of(T.Q8_0, 4096, 256, seed=1); "
            "torch.manual_seed(0); x = torch.randn(2, 256); "
            "torch.save(kernels.ops().qlinear(x, b, k), sys.argv[1]); print(kernels.pool_stats()['pool'])")
    torch.manual_seed(0)
    x = torch.randn(2, 256)
    ref = ops.qlinear(x, blocks, ktype)
    outs = {}
    for pool in ("static", "guided"):
        path = f"{os.environ.get('TMPDIR', '/tmp')}/gl_pool_{pool}_{os.getpid()}.pt"
        r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                           env={**os.environ, "GEMMALAB_POOL": pool if pool == "static" else "", "GEMMALAB_ISA": kernels.isa()},
                           cwd=os.path.dirname(os.path.dirname(__file__)))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == pool
        outs[pool] = torch.load(path)
        os.unlink(path)
    assert torch.equal(outs["static"], ref) and torch.equal(outs["guided"], ref)


def test_pool_survives_a_busy_core():
    """Beside a process that keeps one core busy, results stay exact and the pool keeps going
    (it may switch to the caller alone; it never waits on a thread that has no chunk)."""
    hog = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<20: pass"])
    try:
        blocks, ktype = blocks_of(T.Q4_K, 2048, 1024, seed=2)
        x = torch.randn(1, 1024)
        ref = ops.qlinear(x, blocks, ktype)
        kernels.reset_pool_stats()
        for _ in range(300):
            assert torch.equal(ops.qlinear(x, blocks, ktype), ref)
        st = kernels.pool_stats()
        assert st["jobs"] >= 300
    finally:
        hog.kill()
        hog.wait()


def test_prefill_dtype_follows_the_cpu_and_the_override(monkeypatch):
    from gemmalab.quant.linear import prefill_dtype
    monkeypatch.delenv("GEMMALAB_CPU_BF16", raising=False)
    assert (prefill_dtype() == torch.bfloat16) == (cpu.native_bf16() and cpu._torch_has_bf16())
    monkeypatch.setenv("GEMMALAB_CPU_BF16", "0")
    assert prefill_dtype() == torch.float32
    monkeypatch.setenv("GEMMALAB_CPU_BF16", "1")
    assert prefill_dtype() == torch.bfloat16
    monkeypatch.setenv("GEMMALAB_CPU_BF16", "maybe")
    with pytest.raises(ValueError, match="GEMMALAB_CPU_BF16"):
        prefill_dtype()


@pytest.mark.slow
def test_bf16_prefill_quality_against_fp32(lm, model_path, monkeypatch):
    """The many-row products in bf16 (CPUs with native bf16) against the fp32 model, teacher-forced
    on prose. Without native bf16 the same path is checked on fewer tokens (it is slow there, which
    is why it is off by default on such CPUs)."""
    import sys
    from pathlib import Path

    import gemmalab
    text = (Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
            / "LICENSE.txt")
    text = text.read_text() if text.exists() else Path(gemmalab.__file__).with_name("tokenizer.py").read_text()
    native = gemmalab.load(model_path, mode="native")
    ids = native.tokenizer.encode(text, add_bos=True)[:384 if cpu.native_bf16() else 48]
    ref = torch.log_softmax(lm.logits(ids), -1)
    monkeypatch.setenv("GEMMALAB_CPU_BF16", "0")
    fp32 = torch.log_softmax(native.logits(ids), -1)
    monkeypatch.setenv("GEMMALAB_CPU_BF16", "1")
    bf16 = torch.log_softmax(native.logits(ids), -1)
    assert not torch.equal(fp32, bf16)  # the bf16 path did run
    for name, lp in (("fp32", fp32), ("bf16", bf16)):
        kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"native prefill {name}: KL {kl:.5f}, top-1 {top1:.4f}")
        assert kl <= 0.01 and top1 >= 0.97, (name, kl, top1)
