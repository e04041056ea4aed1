"""RULER-offline: a subset of RULER's synthetic long-context tasks generated without downloads.

After NVIDIA/RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?", scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,
freq_words_extraction}.py): the same needle sentence, templates, answer prefixes, key / value
kinds (adjective-noun words, 7-digit numbers, uuid4), depth grid and scoring (string_match_all).
What differs, so the numbers are labelled "RULER-offline" and are NOT comparable with published
RULER scores:
- the prose haystack is CPython's own `pydoc_data.topics` (the language reference) instead of
  Paul Graham's essays, split into sentences by a regex instead of nltk's punkt;
- common-words extraction draws from wonderwords' noun list instead of RULER's english_words.json,
  and no task has RULER's one-shot example in front;
- SQuAD / HotpotQA QA tasks need datasets and are left out.
Each sample is fitted to the requested length with the model's own tokenizer (binary search over
the haystack size, like RULER): prompt tokens + tokens_to_generate <= length.
"""
from __future__ import annotations

import random
import re
import string
import uuid
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from functools import lru_cache

__all__ = ["TASKS", "Sample", "generate", "string_match_all", "string_match_part", "score",
           "mrcr_grade", "NOISE", "NEEDLE", "prose_sentences"]

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure "
                 "to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
                 "What are all the special magic {type_needle_v} for {query} mentioned in the "
                 "provided text?")
NIAH_ANSWER = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following "
               "text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} "
               "in the text above.")
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
             "variables are assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than "
                "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the "
                "10 most common words in the above list?")
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the "
                "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
                "explanation. Please ignore the dots '....'. What are the three most frequently "
                "appeared words in the above coded text?")
FWE_ANSWER = (" Answer: According to the coded text above, the three most frequently appeared words "
              "are:")
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.linspace(0, 100, 40), rounded

# RULER's scripts/synthetic.yaml, the part that runs offline (tokens_to_generate as RULER's).
TASKS = {
    "niah_single_1": dict(kind="niah", haystack="noise", k="words", v="numbers", nk=1, nv=1, nq=1),
    "niah_single_2": dict(kind="niah", haystack="prose", k="words", v="numbers", nk=1, nv=1, nq=1),
    "niah_multikey_1": dict(kind="niah", haystack="prose", k="words", v="numbers", nk=4, nv=1, nq=1),
    "niah_multikey_2": dict(kind="niah", haystack="needle", k="words", v="numbers", nk=1, nv=1, nq=1),
    "niah_multikey_3": dict(kind="niah", haystack="needle", k="uuids", v="uuids", nk=1, nv=1, nq=1),
    "niah_multivalue": dict(kind="niah", haystack="prose", k="words", v="numbers", nk=1, nv=4, nq=1),
    "vt": dict(kind="vt", chains=1, hops=4),
    "cwe": dict(kind="cwe", freq_cw=30, freq_ucw=3, num_cw=10),
    "fwe": dict(kind="fwe", alpha=2.0),
}
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}


@dataclass
class Sample:
    task: str
    length: int  # the requested token budget (prompt + tokens_to_generate)
    prompt: str  # without BOS (the tokenizer adds it)
    answers: list[str]
    tokens_to_generate: int
    prompt_tokens: int = 0
    meta: dict = field(default_factory=dict)


# ---- word sources --------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _wonderwords(name: str) -> tuple[str, ...]:
    try:
        from wonderwords.random_word import _get_words_from_text_file
    except ImportError as e:  # pragma: no cover - the eval extra installs it
        raise ImportError("RULER-offline needs wonderwords (pip install 'gemmalab[eval]')") from e
    return tuple(_get_words_from_text_file(name))


@lru_cache(maxsize=None)
def prose_sentences() -> tuple[str, ...]:
    """The prose haystack: CPython's pydoc topics (the language reference), one sentence each."""
    from pydoc_data.topics import topics
    text = " ".join(topics[k] for k in sorted(topics))
    text = re.sub(r"\s+", " ", text)
    out = []
    for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", text):
        words = sent.split(" ")  # code listings run long without a full stop: cap units at 40 words
        out += [" ".join(words[i:i + 40]) for i in range(0, len(words), 40) if words[i:i + 40] != [""]]
    return tuple(out)


def _key(rng: random.Random, kind: str) -> str:
    if kind == "words":
        return f"{rng.choice(_wonderwords('adjectivelist.txt'))}-{rng.choice(_wonderwords('nounlist.txt'))}"
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle kind {kind!r}")


# ---- fitting to a token budget ------------------------------------------------------------------

def _fit(build, count_tokens, budget: int, lo: int = 1, hi: int = 1 << 20):
    """The largest n with tokens(build(n)) <= budget, by binary search (RULER fits its haystacks the
    same way); returns (n, built, tokens)."""
    best = None
    n = lo
    while True:  # exponential search for an upper bound first
        built = build(n)
        t = count_tokens(built)
        if t > budget:
            hi = n
            break
        best = (n, built, t)
        lo = n
        if n >= hi:
            break
        n = min(hi, n * 2)
    if best is None:
        raise ValueError(f"a {budget}-token budget is too short even for the smallest prompt "
                         f"({t} tokens)")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        built = build(mid)
        t = count_tokens(built)
        if t <= budget:
            best, lo = (mid, built, t), mid
        else:
            hi = mid
    return best


def _singular(cfg) -> bool:
    return cfg["nq"] * cfg["nv"] == 1


def _niah(rng: random.Random, cfg: dict, depth: float | None):
    type_v = cfg["v"]
    keys, values, needles = [], [], []
    for _ in range(cfg["nk"]):
        keys.append(_key(rng, cfg["k"]))
        vals = [_key(rng, type_v) for _ in range(cfg["nv"])]
        values.append(vals)
        needles += [NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=v) for v in vals]
    rng.shuffle(needles)
    query_idx = rng.sample(range(cfg["nk"]), cfg["nq"])
    queries = [keys[i] for i in query_idx]
    answers = [v for i in query_idx for v in values[i]]
    depths = ([depth] * len(needles) if depth is not None and len(needles) == 1
              else sorted(rng.sample(DEPTHS, len(needles))))
    template, answer_prefix = NIAH_TEMPLATE, NIAH_ANSWER
    if _singular(cfg):  # RULER rewrites the template for one query with one value
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        answer_prefix = answer_prefix.replace("are", "is")
        type_v = type_v[:-1]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    distractor_seed = rng.getrandbits(32)

    def build(n: int):
        units = _haystack_units(n, distractor_seed, cfg)
        positions = [int(len(units) * d / 100) for d in depths]
        out = list(units)
        for pos, needle in sorted(zip(positions, needles), key=lambda x: x[0], reverse=True):
            out.insert(pos, needle)
        context = " ".join(out)
        return (template.format(type_needle_v=type_v, context=context, query=query)
                + answer_prefix.format(type_needle_v=type_v, query=query),
                dict(depths=depths, needles=needles, positions=positions, units=len(units)))
    return build, answers


def _haystack_units(n: int, seed: int, cfg: dict) -> list[str]:
    kind = cfg["haystack"]
    if kind == "noise":
        return [NOISE] * n
    if kind == "prose":
        sents = prose_sentences()
        start = seed % len(sents)
        return [sents[(start + i) % len(sents)] for i in range(n)]
    if kind == "needle":  # distractor needles with their own random keys and values
        r = random.Random(seed)
        return [NEEDLE.format(type_needle_v=cfg["v"], key=_key(r, cfg["k"]), value=_key(r, cfg["v"]))
                for _ in range(n)]
    raise ValueError(f"unknown haystack {kind!r}")


def _vt(rng: random.Random, cfg: dict):
    def name():
        return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
    value = str(rng.randint(10000, 99999))
    names = []
    while len(names) < cfg["hops"] + 1:
        v = name()
        if v not in names:
            names.append(v)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}."
                                                for i in range(1, len(names))]
    fractions = sorted(rng.random() for _ in chain)

    def build(n: int):
        units = [NOISE] * n
        for frac, stmt in sorted(zip(fractions, chain), key=lambda x: x[0], reverse=True):
            units.insert(int(frac * n), stmt)
        # inserting from the back keeps the chain in order
        context = " ".join(units)
        return (VT_TEMPLATE.format(context=context, query=value)
                + VT_ANSWER.format(num_v=len(names), query=value), dict(chain=chain))
    return build, names


def _cwe(rng: random.Random, cfg: dict):
    nouns = list(_wonderwords("nounlist.txt"))
    rng.shuffle(nouns)
    common = nouns[:cfg["num_cw"]]
    pool = nouns[cfg["num_cw"]:]
    order_seed = rng.getrandbits(32)

    def build(n: int):
        words = common * cfg["freq_cw"] + pool[:n] * cfg["freq_ucw"]
        random.Random(order_seed).shuffle(words)
        context = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return CWE_TEMPLATE.format(context=context) + CWE_ANSWER, dict(uncommon=n)
    return build, common


def _fwe(rng: random.Random, cfg: dict):
    vocab = []
    while len(vocab) < 1000:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(6))
        if w not in vocab:
            vocab.append(w)
    vocab[0] = "...."  # RULER: the most frequent "word" is noise that the question excludes
    weights = [1.0 / (k + 1) ** cfg["alpha"] for k in range(len(vocab))]  # zeta(alpha), truncated
    draw_seed = rng.getrandbits(32)

    def build(n: int):
        r = random.Random(draw_seed)
        words = r.choices(vocab, weights=weights, k=n)
        counts = {}
        for w in words:
            counts[w] = counts.get(w, 0) + 1
        return FWE_TEMPLATE.format(context=" ".join(words)) + FWE_ANSWER, dict(counts=counts)
    return build, vocab[1:4]


def generate(task: str, length: int, tokenizer, *, seed: int = 0, index: int = 0,
             depth: float | None = None) -> Sample:
    """One sample of `task` fitted to `length` tokens (prompt + tokens_to_generate), deterministic
    in (task, length, seed, index). depth (0-100): the needle's depth for single-needle tasks
    (default: drawn from RULER's 40-point grid)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER-offline task {task!r}; choose from {', '.join(TASKS)}")
    cfg = TASKS[task]
    gen = TOKENS_TO_GENERATE[cfg["kind"]]
    if length <= gen + 64:
        raise ValueError(f"length {length} is too short for {task} ({gen} tokens are reserved for "
                         "the answer)")
    if depth is not None and not 0 <= depth <= 100:
        raise ValueError(f"depth must be in [0, 100], got {depth}")
    rng = random.Random(f"{task}/{length}/{seed}/{index}")
    kind = cfg["kind"]
    if kind == "niah":
        build, answers = _niah(rng, cfg, depth)
    elif kind == "vt":
        build, answers = _vt(rng, cfg)
    elif kind == "cwe":
        build, answers = _cwe(rng, cfg)
    else:
        build, answers = _fwe(rng, cfg)

    def count(built):
        return len(tokenizer.encode(built[0], add_bos=True))
    n, (prompt, meta), tokens = _fit(build, count, length - gen)
    if kind == "fwe":  # the reference is the observed top 3 (a short text can reorder the draw)
        counts = meta.pop("counts")
        ranked = sorted((w for w in counts if w != "...."), key=lambda w: (-counts[w], w))
        answers = ranked[:3]
    return Sample(task, length, prompt, list(answers), gen, tokens, dict(meta, size=n))


# ---- scoring (RULER scripts/eval/synthetic/constants.py) -------------------------------------------

def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """Mean over samples of the fraction of references contained (case-insensitive), x100."""
    if len(preds) != len(refs) or not preds:
        raise ValueError("string_match_all needs as many predictions as reference lists (>= 1)")
    return 100 * sum(sum(r.lower() in p.lower() for r in rs) / len(rs)
                     for p, rs in zip(preds, refs)) / len(preds)


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    """Mean over samples of 1 if any reference is contained (case-insensitive), x100."""
    if len(preds) != len(refs) or not preds:
        raise ValueError("string_match_part needs as many predictions as reference lists (>= 1)")
    return 100 * sum(max(r.lower() in p.lower() for r in rs) for p, rs in zip(preds, refs)) / len(preds)


def score(task: str, preds: list[str], refs: list[list[str]]) -> float:
    """RULER's metric of the task: string_match_all for every offline task (part is for QA)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER-offline task {task!r}")
    return string_match_all(preds, refs)


def mrcr_grade(response: str, answer: str, random_string_to_prepend: str) -> float:
    """The grader of MRCR (openai/mrcr's dataset card): 0 unless the response starts with the
    random string; else difflib's ratio between response and answer with that string removed."""
    if not response.startswith(random_string_to_prepend):
        return 0.0
    response = response.removeprefix(random_string_to_prepend)
    answer = answer.removeprefix(random_string_to_prepend)
    return float(SequenceMatcher(None, response, answer).ratio())
