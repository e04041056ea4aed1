"""The lm-evaluation-harness backend (gemmalab/eval/harness.py) against `lm.logits` / `lm.generate`.

The scores must be the ones our own model API gives: loglikelihoods are log_softmax of `lm.logits`
summed over the continuation, rolling loglikelihoods the same over windows, generate_until the greedy
`lm.generate` output cut at the stop sequence. Datasets cannot be downloaded here, so the end-to-end
runs use small local YAML tasks over JSONL files (`write_tasks`), as docs/eval_harness.md shows.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_eval.api.instance import Instance

import gemmalab
import gemmalab.eval.harness as harness  # registers "gemmalab" with lm-eval

from .distill_helpers import tiny_teacher_gguf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: on a shared 2-core machine, thread synchronisation costs far more than the
    products themselves (a 30 x 64 x 128 linear: 13 us on one thread, 0.9 ms on two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny_teacher_gguf(tmp_path_factory.mktemp("harness") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return gemmalab.load(tiny_path, mode="fp32")


def backend(lm, **kwargs):
    return harness.GemmalabLM(lm=lm, **kwargs)


def ll_requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


# ---- references computed with lm.logits -------------------------------------------------------


def split(lm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's context/continuation tokens for a causal model (TemplateLM._encode_pair and
    TemplateLM.loglikelihood): trailing context spaces move to the continuation, the whole text and
    the context are encoded (with BOS), the continuation is the tail; an empty context is BOS."""
    tok = lm.tokenizer
    if context == "":
        return [tok.bos_id], tok.encode(continuation, add_bos=False)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def scored(lm, inp: list[int], targets: list[int]) -> tuple[float, bool]:
    """log p(targets) and greedy flag when the last len(targets) positions of `inp` predict them."""
    logp = torch.log_softmax(lm.logits(inp)[-len(targets):], -1)
    t = torch.tensor(targets)
    return float(logp.gather(1, t[:, None]).sum()), bool((logp.argmax(-1) == t).all())


def reference_ll(lm, context, continuation):
    ctx, cont = split(lm, context, continuation)
    return scored(lm, (ctx + cont)[:-1], cont)


def greedy_pair(lm, context: str, n: int = 3) -> tuple[str, str]:
    """(context, the model's own greedy continuation as text): a request whose greedy flag is True,
    so that the flag comparison is not only ever comparing False with False."""
    ctx = lm.tokenizer.encode(context)
    ids = lm.generate(ctx, max_new_tokens=n, temperature=0).token_ids
    return context, lm.tokenizer.decode(ids)


PAIRS = [
    ("The theory of the thing", " is that they think three times."),
    ("Hello world,", " hello there!"),
    ("", "In the beginning the earth was without form."),
    ("Question: what is there?\nAnswer: ", "nothing in the world"),
    ("def f(x):\n   ", " return x"),
    ("There is nothing in the world that a thinker thinks through. " * 3, " Hello"),
]


@pytest.mark.parametrize("mode", ["fp32", "native"])
def test_loglikelihood_matches_lm_logits(tiny_path, tiny, mode):
    """fp32: equal to lm.logits within 1e-4, greedy flags equal. native: the same scores for every
    batch size and chunking (the backend keeps every product above the 8-bit-activation size, see
    GemmalabLM._min_rows), and near lm.logits, whose short products use 8-bit activations."""
    lm = tiny if mode == "fp32" else gemmalab.load(tiny_path, mode=mode)
    pairs = PAIRS + [greedy_pair(lm, "The theory of the"), greedy_pair(lm, "In the beginning")]
    want = [reference_ll(lm, c, x) for c, x in pairs]
    assert any(g for _, g in want), "no request is greedy: the flag check would be vacuous"
    assert len({len(split(lm, c, x)[0] + split(lm, c, x)[1]) for c, x in pairs}) > 3  # padding
    # batch 1, a padded batch, and chunk_size 16: the long request goes through the KV cache path
    runs = [backend(lm, **kwargs).loglikelihood(ll_requests(pairs), disable_tqdm=True)
            for kwargs in (dict(batch_size=1), dict(batch_size=5), dict(batch_size=8, chunk_size=16))]
    for got in runs:
        for (ll, g), (ll_ref, g_ref), (ll_1, _), pair in zip(got, want, runs[0], pairs):
            assert ll == pytest.approx(ll_1, abs=1e-4), pair
            if mode == "fp32":
                assert ll == pytest.approx(ll_ref, abs=1e-4) and g == g_ref, pair
            else:
                assert ll == pytest.approx(ll_ref, rel=2e-2), pair


def test_trailing_context_space_moves_to_the_continuation(tiny):
    b = backend(tiny, batch_size=2)
    a, c = b.loglikelihood(ll_requests([("Answer: ", "Hello"), ("Answer:", " Hello")]),
                           disable_tqdm=True)
    assert a == pytest.approx(c, abs=1e-5)


def test_long_inputs_are_cut_from_the_left_keeping_the_bos(tiny):
    context, continuation = PAIRS[-1]
    ctx, cont = split(tiny, context, continuation)
    L = 20
    assert len(ctx) + len(cont) - 1 > L
    inp = (ctx + cont)[:-1]
    want = scored(tiny, [tiny.tokenizer.bos_id] + inp[-(L - 1):], cont)
    (got,) = backend(tiny, max_length=L).loglikelihood(ll_requests([(context, continuation)]),
                                                      disable_tqdm=True)
    assert got[0] == pytest.approx(want[0], abs=1e-4)


@pytest.mark.slow  # imports transformers (10-20 s on a busy 2-core machine)
def test_scores_equal_lm_evals_hf_backend(tmp_path, tiny):
    """The same model as a transformers checkpoint under lm-eval's own HFLM ("--model hf"): the
    same loglikelihoods and greedy flags (so the context/continuation split is HFLM's), and HFLM's
    rolling loglikelihood is ours with a second BOS in front (lm-eval issue #3333), the one place
    where we deliberately differ."""
    from lm_eval.models.huggingface import HFLM

    from gemmalab.checkpoints.export import save_hf

    save_hf(tiny.model, tiny.tokenizer, tmp_path / "hf", dtype="fp32")
    hf = HFLM(pretrained=str(tmp_path / "hf"), dtype="float32", device="cpu", batch_size=4)
    ours = backend(tiny, batch_size=4)
    pairs = PAIRS + [greedy_pair(tiny, "The theory of the")]
    for (a, ga), (b, gb) in zip(hf.loglikelihood(ll_requests(pairs), disable_tqdm=True),
                                ours.loglikelihood(ll_requests(pairs), disable_tqdm=True)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    texts = [TEXT, "Hello world, hello there!"]
    (h1, h2), (o1, o2) = rolling(hf, texts), rolling(ours, ["<bos>" + t for t in texts])
    assert h1 == pytest.approx(o1, abs=1e-3) and h2 == pytest.approx(o2, abs=1e-3)
    assert rolling(ours, texts)[0] > h1 + 1.0  # the doubled BOS costs HFLM several nats


# ---- loglikelihood_rolling ---------------------------------------------------------------------


def reference_rolling(lm, tokens: list[int], L: int, bos_every_window: bool) -> float:
    """Sum of log p(token) over lm-eval's rolling windows (lm_eval.api.model.LM.loglikelihood_rolling
    docstring): each token predicted once; windows predict L - 1 tokens with a BOS in front
    (bos_every_window), or L tokens with only the first window after a BOS (lm-eval's own layout);
    the last window still gets a full context."""
    bos, n = lm.tokenizer.bos_id, len(tokens)
    span = L - 1 if bos_every_window else L
    total, a = 0.0, 0
    while a < n:
        end = min(n, a + span)
        if a == 0:  # BOS + tokens[:end-1]: row r predicts tokens[r]
            inp, row0 = [bos] + tokens[:end - 1], 0
        else:  # the `span` tokens before the last one predicted: row r predicts tokens[s + 1 + r]
            s = end - 1 - span
            inp, row0 = tokens[s:end - 1], s + 1
            if bos_every_window:
                inp, row0 = [bos] + inp, s
        assert len(inp) <= L
        logp = torch.log_softmax(lm.logits(inp), -1)
        total += float(logp[torch.arange(a, end) - row0, torch.tensor(tokens[a:end])].sum())
        a = end
    return total


TEXT = ("The theory of the thing is that they think three times. There is nothing in the world "
        "that a thinker thinks through. Hello world, hello there! In the beginning the earth was "
        "without form.")


def rolling(b, texts):
    return b.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                    for i, t in enumerate(texts)], disable_tqdm=True)


def test_rolling_loglikelihood_of_a_short_text_is_its_token_logprob_sum(tiny):
    tokens = tiny.tokenizer.encode(TEXT, add_bos=False)
    logp = torch.log_softmax(tiny.logits([tiny.tokenizer.bos_id] + tokens[:-1]), -1)
    want = float(logp[torch.arange(len(tokens)), torch.tensor(tokens)].sum())
    for bos_every_window in (True, False):
        (got,) = rolling(backend(tiny, rolling_bos=bos_every_window), [TEXT])
        assert got == pytest.approx(want, abs=1e-3)  # one BOS, not HFLM's two (lm-eval #3333)


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A tiny model whose context (12 tokens) is a third of TEXT (34 tokens)."""
    path = tiny_teacher_gguf(tmp_path_factory.mktemp("ctx12") / "tiny12.gguf",
                             max_position_embeddings=12)
    return gemmalab.load(path, mode="fp32")


@pytest.mark.parametrize("bos_every_window", [True, False])
def test_rolling_windows_a_text_longer_than_the_context(short_context, bos_every_window):
    lm = short_context
    L = lm.config.max_position_embeddings
    tokens = lm.tokenizer.encode(TEXT, add_bos=False)
    assert len(tokens) > 2 * L + 3  # three windows or more, the last one partial
    want = reference_rolling(lm, tokens, L, bos_every_window)
    b = backend(lm, batch_size=3, rolling_bos=bos_every_window)
    assert b.max_length == L
    got = rolling(b, [TEXT, "Hello world", TEXT])
    assert got[0] == pytest.approx(want, abs=1e-3) and got[2] == pytest.approx(want, abs=1e-3)
    short = lm.tokenizer.encode("Hello world", add_bos=False)
    assert got[1] == pytest.approx(reference_rolling(lm, short, L, bos_every_window), abs=1e-4)
    # the layouts differ, so each test checks its own
    other = reference_rolling(lm, tokens, L, not bos_every_window)
    assert abs(other - want) > 1e-3


# ---- generate_until ----------------------------------------------------------------------------


def generate_requests(prompts, gen_kwargs):
    return [Instance("generate_until", {}, (p, dict(gen_kwargs)), i) for i, p in enumerate(prompts)]


def greedy_text(lm, prompt: str, n: int) -> str:
    ids = lm.generate(lm.tokenizer.encode(prompt), max_new_tokens=n, temperature=0).token_ids
    ids = [t for t in ids if t not in lm.tokenizer.stop_ids]
    return lm.tokenizer.decode(ids, skip_special=True)


PROMPTS = ["The theory of the thing is", "Hello world,", "In the beginning", "def f(x):"]


def test_generate_until_stops_at_the_stop_sequence(tiny):
    full = [greedy_text(tiny, p, 24) for p in PROMPTS]
    # a stop string from the middle of each greedy text: the answer is the text before it
    stops = [t[len(t) // 2:len(t) // 2 + 2] for t in full]
    assert all(len(s) == 2 for s in stops)
    for b in (backend(tiny, batch_size=1), backend(tiny, batch_size=3)):
        for prompt, text, stop in zip(PROMPTS, full, stops):
            (got,) = b.generate_until(generate_requests([prompt], {"until": [stop],
                                                                   "max_gen_toks": 24}),
                                      disable_tqdm=True)
            assert got == text.split(stop)[0] and len(got) < len(text), (prompt, stop, got)
        # a batch of the four prompts (lengths differ), without stop strings: max_gen_toks ends them
        got = b.generate_until(generate_requests(PROMPTS, {"until": [], "max_gen_toks": 24,
                                                           "do_sample": False}), disable_tqdm=True)
        assert got == full


def test_generate_until_samples_when_asked(tiny):
    b = backend(tiny, batch_size=2)
    args = {"until": [], "max_gen_toks": 16, "do_sample": True, "temperature": 1.0}
    torch.manual_seed(0)
    a = b.generate_until(generate_requests(PROMPTS[:2], args), disable_tqdm=True)
    torch.manual_seed(1)
    c = b.generate_until(generate_requests(PROMPTS[:2], args), disable_tqdm=True)
    assert a != c and a != [greedy_text(tiny, p, 16) for p in PROMPTS[:2]]


def test_chat_template_prompts_get_one_bos(tiny):
    """--apply-chat-template: the template text starts with "<bos>", so tok_encode adds none
    (HFLM's has_bos_prefix rule) and the ids are the tokenizer's own chat encoding."""
    b = backend(tiny)
    messages = [{"role": "user", "content": "Hello world"}]
    ids = b.tok_encode(b.apply_chat_template(messages))
    assert ids == tiny.tokenizer.encode_chat(messages)
    assert ids.count(tiny.tokenizer.bos_id) == 1


def test_unknown_model_args_are_refused(tiny):
    with pytest.raises(ValueError, match="unknown gemmalab model_args: flash"):
        backend(tiny, flash=True)
    with pytest.raises(ValueError, match="batch_size=auto"):
        backend(tiny, batch_size="auto")


# ---- local tasks and the CLI -------------------------------------------------------------------

MC_DOCS = [
    ("What is the capital of France?", ["Paris", "London", "Tokyo", "Madrid"], 0),
    ("How many legs does a spider have?", ["six", "eight", "four", "ten"], 1),
    ("What color is the sky on a clear day?", ["green", "red", "blue", "black"], 2),
    ("Which animal says moo?", ["cat", "dog", "sheep", "cow"], 3),
    ("What is two plus two?", ["four", "five", "three", "six"], 0),
    ("What do bees make?", ["milk", "honey", "silk", "wool"], 1),
    ("Which planet do we live on?", ["Mars", "Venus", "Earth", "Jupiter"], 2),
    ("What is frozen water called?", ["steam", "sand", "glass", "ice"], 3),
]
GEN_DOCS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
            ("Spain", "Madrid"), ("England", "London"), ("Russia", "Moscow"), ("Egypt", "Cairo")]
PPL_DOCS = [
    "The sun rises in the east and sets in the west. Every day it crosses the sky.",
    "Water boils at one hundred degrees Celsius at sea level, and freezes at zero.",
    "A cat is a small animal that many people keep at home. Cats like to sleep in the sun.",
    "In the beginning the earth was without form, and the theory of the thing was unknown.",
]


def write_tasks(folder: Path) -> Path:
    """Three local lm-eval tasks (a folder for --include-path): gemmalab_mc (multiple_choice:
    loglikelihood), gemmalab_gen (generate_until, exact match) and gemmalab_ppl
    (loglikelihood_rolling: word/byte perplexity, bits per byte), each over a JSONL file."""
    folder.mkdir(parents=True, exist_ok=True)

    def jsonl(name, rows):
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path.resolve()

    mc = jsonl("mc.jsonl", [{"question": q, "choices": c, "answer": a} for q, c, a in MC_DOCS])
    gen = jsonl("gen.jsonl", [{"country": c, "capital": a} for c, a in GEN_DOCS])
    ppl = jsonl("ppl.jsonl", [{"text": t} for t in PPL_DOCS])
    # lm-eval's `dataset_path: json` + data_files: the Hugging Face datasets JSON builder (its
    # cache_dir here, not ~/.cache/huggingface, keeps the tests to their own folder)
    cache = (folder / "hf_datasets").resolve()
    (folder / "gemmalab_mc.yaml").write_text(f"""\
task: gemmalab_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    (folder / "gemmalab_gen.yaml").write_text(f"""\
task: gemmalab_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
  cache_dir: {cache}
test_split: test
fewshot_split: test  # the shots are other documents (lm-eval leaves the document itself out)
num_fewshot: 3
fewshot_delimiter: ".\\n"
output_type: generate_until
doc_to_text: "The capital of {{{{country}}}} is"
doc_to_target: "{{{{capital}}}}"
generation_kwargs:
  until: [".", ",", "\\n"]
  max_gen_toks: 6
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
""")
    (folder / "gemmalab_ppl.yaml").write_text(f"""\
task: gemmalab_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {ppl}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return folder


def cli(*args):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "gemmalab", "eval", "harness", "--threads", "1",
                           *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_simple_evaluate_finds_the_registered_model(tmp_path, tiny_path):
    """The library route of the docs: import gemmalab.eval.harness, then lm-eval by name."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    assert get_model("gemmalab") is harness.GemmalabLM and issubclass(harness.GemmalabLM, LM)
    tasks = write_tasks(tmp_path / "tasks")
    out = lm_eval.simple_evaluate(
        model="gemmalab", model_args=f"pretrained={tiny_path},mode=fp32", tasks=["gemmalab_mc"],
        limit=3, task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True)
    acc = out["results"]["gemmalab_mc"]["acc,none"]
    # acc is the share of documents whose target choice has the highest loglikelihood
    samples = out["samples"]["gemmalab_mc"]
    assert len(samples) == 3
    best = [max(range(4), key=lambda i: s["filtered_resps"][i][0]) == s["target"] for s in samples]
    assert acc == pytest.approx(sum(best) / 3)


def test_cli_end_to_end_on_local_tasks(tmp_path, tiny_path):
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "out"
    r = cli("--tasks", "gemmalab_mc,gemmalab_gen,gemmalab_ppl", "--include-path", tasks,
            "--model", tiny_path, "--mode", "fp32", "--limit", 4, "--batch-size", 4,
            "--out", out, "--log-samples", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    printed = json.loads(r.stdout)  # --json: stdout is exactly one JSON object
    report = json.loads((out / "harness.json").read_text())
    results = report["results"]
    assert printed["results"] == results
    assert set(results) == {"gemmalab_mc", "gemmalab_gen", "gemmalab_ppl"}
    assert report["config"]["model"] == "gemmalab"
    assert report["config"]["model_args"]["pretrained"] == str(tiny_path)
    assert 0.0 <= results["gemmalab_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["gemmalab_mc"]["acc_norm,none"] <= 1.0
    assert 0.0 <= results["gemmalab_gen"]["exact_match,strip"] <= 1.0
    ppl = results["gemmalab_ppl"]
    # the perplexities are the per-document loglikelihoods the samples hold, aggregated
    rows = json.loads((out / "harness_samples_gemmalab_ppl.json").read_text())
    assert len(rows) == 4
    lls = [row["filtered_resps"][0] for row in rows]  # loglikelihood_rolling: [ll]
    words = sum(len(t.split()) for t in PPL_DOCS)
    nbytes = sum(len(t.encode()) for t in PPL_DOCS)
    assert ppl["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-6)
    assert ppl["bits_per_byte,none"] == pytest.approx(-sum(lls) / nbytes / math.log(2), rel=1e-6)
    # a random model over a 512-piece vocabulary: between chance (ln 512 per token) and certainty
    assert 1.0 < ppl["byte_perplexity,none"] < 512
    table = (out / "harness.md").read_text()
    assert "gemmalab_mc" in table and "word_perplexity" in table and "exact_match" in table


@pytest.mark.slow  # lm-eval indexes its 14k built-in tasks to know a name is unknown: 15-30 s
def test_cli_unknown_task_is_one_line(tmp_path, tiny_path):
    tasks = write_tasks(tmp_path / "tasks")
    r = cli("--tasks", "gemmalab_mc,no_such_task_xyz", "--include-path", tasks, "--model",
            tiny_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemmalab: error: unknown task 'no_such_task_xyz'")


def test_cli_missing_model_is_one_line(tmp_path):
    r = cli("--tasks", "gemmalab_mc", "--model", tmp_path / "missing.gguf")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemmalab: error: model not found")
