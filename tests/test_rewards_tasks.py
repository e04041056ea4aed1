"""Procedural task families and their verifiers: determinism, held-out splits, references that pass
their own tests in the sandbox, graded scores, and the answers a reward hacker would try."""
import json
import multiprocessing
import os
import time

import pytest

from gemmalab.sandbox import Sandbox
from gemmalab.train.rewards import Problem, RewardResult
from gemmalab.train.rewards.pairs import (PairFileError, preference_pairs, read_pairs_jsonl,
                                          write_pairs_jsonl)
from gemmalab.train.rewards.tasks import (CODE_TEMPLATES, FAMILIES, code_solution, make_problems,
                                          reasoning_gym_score, templates)
from gemmalab.train.rewards.verifiers import (AnswerMatch, CodeTests, MathAnswer, MathWorker,
                                              ReasoningGymAnswer, number_scores, sequence_scores)

GENERATED = ["code", "sort", "next_number", "add", "gsm", "basic_arithmetic"]


@pytest.fixture(scope="module")
def box():
    # a short wall limit, so the infinite-loop case costs 1.5 s
    return Sandbox(cpu_s=1, wall_s=1.5)


@pytest.fixture(scope="module")
def he_box():
    return Sandbox(cpu_s=3, wall_s=10, mem_mb=1024)  # gemmalab eval humaneval's limits


@pytest.fixture(scope="module")
def math_answer():
    m = MathAnswer(timeout_s=3)
    yield m
    m.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- generators ------------------------------------------------------------------------------
def test_registry_and_option_errors():
    assert set(GENERATED + ["humaneval"]) <= set(FAMILIES)
    with pytest.raises(ValueError, match="unknown task family 'nope'; valid: code"):
        make_problems("nope", 1)
    with pytest.raises(ValueError, match="unknown option.*colour.*valid: templates, few_shot"):
        make_problems("code", 1, colour="red")
    with pytest.raises(ValueError, match="unknown split"):
        make_problems("sort", 1, split="test")
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 1000000000\)"):
        make_problems("add", 1, seed=-1)
    with pytest.raises(ValueError, match="not in the train split of 'code'"):
        make_problems("code", 1, templates=["filter_between"])  # a held-out template
    with pytest.raises(ValueError, match="few_shot"):
        make_problems("code", 1, few_shot=5)
    with pytest.raises(ValueError, match="evaluation only"):
        make_problems("humaneval", 1)


@pytest.mark.parametrize("family", GENERATED)
def test_generators_are_deterministic_per_seed(family):
    for split in ("train", "heldout"):
        a = [p.to_json() for p in make_problems(family, 6, seed=11, split=split)]
        b = [p.to_json() for p in make_problems(family, 6, seed=11, split=split)]
        c = [p.to_json() for p in make_problems(family, 6, seed=12, split=split)]
        assert a == b
        assert [p["prompt"] for p in a] != [p["prompt"] for p in c]
        for i, p in enumerate(make_problems(family, 6, seed=11, split=split)):
            assert p.id == f"{family}/{p.template}/11/{i}" and p.split == split
            assert p.template in templates(family, split)
            # plain JSON: a problem written to disk reloads equal
            assert Problem.from_json(json.loads(json.dumps(p.to_json()))) == p
    # a prefix of a larger request is the same problems (ids are per index)
    assert make_problems(family, 3, seed=11) == make_problems(family, 6, seed=11)[:3]


@pytest.mark.parametrize("family", GENERATED)
def test_template_and_seed_splits_are_disjoint(family):
    train, held = set(templates(family, "train")), set(templates(family, "heldout"))
    assert train and held and not train & held
    tr = make_problems(family, 30, seed=3)
    he = make_problems(family, 30, seed=3, split="heldout")
    assert {p.template for p in tr} <= train and {p.template for p in he} <= held
    assert not {p.prompt for p in tr} & {p.prompt for p in he}
    assert not {p.id for p in tr} & {p.id for p in he}


def test_code_templates_grammar_and_compositional_holdout():
    train, held = templates("code", "train"), templates("code", "heldout")
    assert 40 <= len(train) + len(held) <= 60 and len(held) >= 5
    parts = lambda name: (name.rsplit("_", 1) if not name.startswith("str_") else (name, name))
    for name in held:
        if name.startswith("str_"):
            continue
        shape, op = parts(name)
        assert any(t.startswith(shape + "_") for t in train), name  # the shape is seen in train
        assert any(t.endswith("_" + op) for t in train), name  # and so is the operation
    # held-out prompts with few-shot examples show train templates only
    for p in make_problems("code", 20, seed=5, split="heldout", few_shot=2):
        assert p.prompt.count("\ndef ") + p.prompt.startswith("def ") == 3
        assert p.prompt.endswith(CODE_TEMPLATES[p.template].header(p.meta["params"]))
        for h in held:
            if h != p.template:
                assert f"def {h}(" not in p.prompt


def one_problem_per_code_template(seed=0):
    out = []
    for split in ("train", "heldout"):
        for name in templates("code", split):
            out += make_problems("code", 1, seed=seed, split=split, templates=[name])
    return out


def test_code_tests_are_discriminative():
    for p in one_problem_per_code_template(seed=1):
        assert 6 <= len(p.tests) <= 10, p.id
        assert len({json.dumps(args) for args, _ in p.tests}) == len(p.tests), p.id
        # at least two distinct expected outputs: no constant answer passes every test
        assert len({json.dumps(e) for _, e in p.tests}) >= 2, p.id
        assert p.prompt.startswith(f"def {p.entry_point}(") and p.prompt.endswith('"""\n')
        assert not any(json.dumps(args)[1:-1] in p.prompt for args, _ in p.tests if args != [""])


def test_every_code_reference_passes_its_tests_in_one_sandbox_call(box):
    """All 58 templates' reference implementations, defined side by side in one box and called
    through a dispatcher: one sandbox start instead of 58; outputs compared here."""
    problems = one_problem_per_code_template(seed=2)
    assert len(problems) == len(CODE_TEMPLATES)
    program = "\n\n".join(code_solution(p.template, p.meta["params"]) for p in problems)
    program += "\n\ndef _dispatch(name, args):\n    return globals()[name](*args)\n"
    calls = [(p, args, expected) for p in problems for args, expected in p.tests]
    results = box.run_calls(program, "_dispatch", [[p.entry_point, args] for p, args, _ in calls])
    bad = [(p.id, args, expected, r) for (p, args, expected), r in zip(calls, results)
           if not r.matches(expected)]
    assert not bad, bad[:3]


def test_code_tests_reward_right_wrong_and_few_shot(box):
    reward = CodeTests(box)
    probs = make_problems("code", 3, seed=4, few_shot=2) + make_problems("code", 2, seed=4)
    res = reward(probs, [p.reference for p in probs])
    assert all(r.status == "ok" and r.value == 1.0 and r.components["exact"] == 1 for r in res), res
    wrong = reward(probs, ["    return None\n"] * len(probs))
    assert all(r.status == "ok" and r.value == 0.0 and r.components["passed"] == 0 for r in wrong)


def test_code_tests_against_hacks(box):
    [p] = make_problems("code", 1, seed=0, templates=["filter_gt"])
    k = p.meta["params"]["k"]
    right = f"    return [x for x in xs if x > {k}]\n"
    cases = {
        "right": right,
        "right, then more code": right + "\n\ndef helper():\n    return 1\n\nprint(helper())\n",
        "right, then a fence": right + "```\n\nThis keeps the elements above k.",
        "off by one": f"    return [x for x in xs if x >= {k}]\n",
        "syntax error": "    return [x for x in xs if x >\n",
        "raises": "    raise ValueError('no')\n",
        "lying __eq__": ("    class Liar:\n        def __eq__(self, other):\n            return True\n"
                         "        __hash__ = object.__hash__\n    return Liar()\n"),
        "os._exit(0)": "    import os\n    os._exit(0)\n",
        "sys.exit in the body": "    import sys\n    sys.exit(0)\n",
        "sys.exit at import": f"    return [x for x in xs if x > {k}]\nimport sys\nsys.exit(0)\n",
        "infinite loop": "    while True:\n        pass\n",
    }
    t0 = time.perf_counter()
    res = dict(zip(cases, CodeTests(box)([p] * len(cases), list(cases.values()))))
    assert time.perf_counter() - t0 < 30
    for name in ("right", "right, then more code", "right, then a fence"):
        assert res[name].status == "ok" and res[name].value == 1.0, (name, res[name])
    assert res["right"].components == {"passed": len(p.tests), "total": len(p.tests), "exact": 1,
                                       "timeout": 0}
    assert res["off by one"].status == "ok" and res["off by one"].value < 1.0
    assert res["off by one"].components["exact"] == 0
    assert res["syntax error"].status == "unparseable" and res["syntax error"].value == 0.0
    assert "SyntaxError" in res["syntax error"].detail
    for name in ("raises", "lying __eq__", "os._exit(0)", "sys.exit in the body",
                 "sys.exit at import"):
        # the candidate's own failure: scored 0, not a verifier failure
        assert res[name].status == "ok" and res[name].value == 0.0, (name, res[name])
    # the candidate's infinite loop fails its tests (leaving it out of the advantage could be gamed)
    loop = res["infinite loop"]
    assert loop.status == "ok" and loop.value == 0.0 and loop.components["timeout"] == 1, loop
    [excluded] = CodeTests(box, timeouts="exclude")([p], [cases["infinite loop"]])
    assert excluded.status == "timeout" and excluded.value is None and not excluded.scored


def test_code_tests_sandbox_failure_is_not_a_zero():
    class Broken:
        def run_calls(self, *a):
            raise OSError("no box today")
    [p] = make_problems("code", 1, seed=0)
    [r] = CodeTests(Broken())([p], [p.reference])
    assert r.status == "sandbox_error" and r.value is None and "no box today" in r.detail
    with pytest.raises(ValueError, match="needs a code problem with tests"):
        CodeTests(Broken())(make_problems("add", 1), ["1"])


def test_humaneval_problems_and_canonical_solutions_pass(he_box):
    problems = make_problems("humaneval", 164, split="heldout")
    assert len(problems) == 164 and len({p.id for p in problems}) == 164
    assert problems[0].id == "humaneval/has_close_elements/0/0"
    assert all(p.family == "humaneval" and p.split == "heldout" and "def check(" in p.meta["test"]
               for p in problems)
    t0 = time.perf_counter()
    res = CodeTests(he_box)(problems, [p.reference for p in problems])
    seconds = time.perf_counter() - t0
    bad = [(p.id, r) for p, r in zip(problems, res) if r.value != 1.0]
    assert not bad, bad[:3]
    print(f"164 HumanEval canonical solutions checked in {seconds:.1f} s")
    wrong = CodeTests(he_box)(problems[:2], ["    return None\n", "    return (\n"])
    assert wrong[0].status == "ok" and wrong[0].value == 0.0
    assert wrong[1].status == "unparseable" and wrong[1].value == 0.0


# ---- one-line answers ------------------------------------------------------------------------
def test_sequence_and_number_scores():
    true = [0, 3, 6, 8]
    assert sequence_scores(true, true) == {"exact": 1.0, "position": 1.0, "kendall": 1.0}
    assert sequence_scores(true[::-1], true)["kendall"] == 0.0
    s = sequence_scores([0, 3, 8, 6], true)
    assert s["position"] == 0.5 and s["kendall"] == pytest.approx((1 + 4 / 6) / 2)
    padded = sequence_scores(["junk", 0, 3, 6, 8, "junk"], true)
    assert padded["exact"] == 0 and padded["position"] == 0 and padded["kendall"] < 0.7
    # ties in the answer: equal items match left to right (ranks 1, 2, 0: one concordant pair)
    assert sequence_scores([3, 3, 1], [1, 3, 3])["kendall"] == pytest.approx((1 - 1 / 3) / 2)
    assert number_scores(42, 42) == {"exact": 1.0, "digits": 1.0, "closeness": 1.0}
    n = number_scores(43, 42)
    assert n["exact"] == 0 and n["digits"] == 0.5 and 0.5 < n["closeness"] < 0.6
    assert number_scores(102, 42)["closeness"] < n["closeness"]  # graded: further is worse


def test_answer_match_graded_and_padding():
    sort = Problem("s", "Numbers: 8 3 0 6\nSorted:", "sort", reference=[0, 3, 6, 8])
    words = Problem("w", "Words: pear apple\nSorted:", "sort", reference=["apple", "pear"])
    add = Problem("a", "Q: 20 + 22 =\nA:", "add", reference=42)
    nxt = Problem("n", "Sequence: 30 34 38\nNext:", "next_number", reference=42)
    cases = [
        (sort, " 0 3 6 8\n\nNumbers: 1 2", "ok", 1.0), (sort, "[0, 3, 6, 8]", "ok", 1.0),
        (sort, " 8 6 3 0", "ok", 0.0), (sort, "hello there", "unparseable", 0.0),
        (sort, "", "unparseable", 0.0), (words, " apple pear", "ok", 1.0),
        (add, " 42\n\nQ: 1 + 1 =", "ok", 1.0), (add, " 1,042", "ok", None),
        (add, "junk 42 junk", "unparseable", 0.0), (add, "\n\n", "unparseable", 0.0),
        (nxt, " 42, 46, 50", "ok", 1.0), (nxt, " 43", "ok", None),
    ]
    res = AnswerMatch()([c[0] for c in cases], [c[1] for c in cases])
    for (problem, text, status, value), r in zip(cases, res):
        assert r.status == status, (text, r)
        if value is not None:
            assert r.value == value, (text, r)
    padded = AnswerMatch()([sort], ["junk 0 3 6 8 junk"])[0]
    assert padded.status == "ok" and padded.components["exact"] == 0 and padded.value < 0.7
    assert 0 < res[7].value < 1 and res[7].components["exact"] == 0  # 1042 is far from 42
    assert res[11].value == pytest.approx(1 / (1 + __import__("math").log(2)))
    exact = AnswerMatch("exact")
    assert exact.name == "answer_match_exact"
    assert [r.value for r in exact([nxt, add], [" 43", " 42"])] == [0.0, 1.0]
    with pytest.raises(ValueError, match="does not apply"):
        AnswerMatch("kendall")([add], ["42"])
    with pytest.raises(ValueError, match="unknown metric"):
        AnswerMatch("bleu")


def test_answer_match_on_generated_problems():
    """The reference, written the way the prompt's own few-shot examples write answers, is exact."""
    reward = AnswerMatch("exact")
    for family in ("sort", "next_number", "add"):
        for split in ("train", "heldout"):
            probs = make_problems(family, 10, seed=9, split=split, few_shot=2)
            shown = [" " + (", ".join(map(str, p.reference)) if isinstance(p.reference, list)
                            else str(p.reference)) + "\n\n" for p in probs]
            assert all(r.value == 1.0 for r in reward(probs, shown)), family
            off = [" " + str(p.reference + 1) if isinstance(p.reference, int) else " 9 9 9"
                   for p in probs]
            assert all(r.value == 0.0 for r in reward(probs, off)), family


# ---- math-verify in a worker -----------------------------------------------------------------
def test_math_answer_right_wrong_unparseable(math_answer):
    [g] = make_problems("gsm", 1, seed=0)
    cot = g.meta["rg_entry"]["metadata"]["answer_cot"]
    p = Problem("m", "Q: 6 * 7?", "gsm", reference="42")
    res = math_answer([p, p, p, p, g], ["The answer is 42.", "It is 41.", "no idea",
                                        "41 42 43", cot])
    assert [r.status for r in res] == ["ok", "ok", "unparseable", "ok", "ok"]
    assert [r.value for r in res] == [1.0, 0.0, 0.0, 0.0, 1.0]  # listing candidates gains nothing


def test_math_answer_huge_power_times_out_and_the_worker_recovers(math_answer):
    p = Problem("m", "", "gsm", reference="42")
    t0 = time.perf_counter()
    [r] = math_answer([p], ["9**9**9**9"])
    assert r.status == "timeout" and r.value is None
    assert time.perf_counter() - t0 < 6
    assert math_answer([p], ["42"])[0].value == 1.0


def test_math_worker_is_killed_restarted_and_closed_without_leaks():
    # math-verify's own alarms off: only the parent's kill can stop "9**9**9**9"
    with MathWorker(timeout_s=2, signal_timeout_s=0) as w:
        assert w.check("42", "42")[:2] == ("ok", True)
        first = w.pid
        assert first and alive(first)
        t0 = time.perf_counter()
        status, _, detail = w.check("42", "9**9**9**9")
        assert status == "timeout" and "killed" in detail and time.perf_counter() - t0 < 5
        assert w.pid is None and not alive(first) and w.restarts == 1
        assert w.check("7", "x = 7")[:2] == ("ok", True)
        second = w.pid
        assert second and second != first
    assert w.pid is None and not alive(second)
    assert not {c.pid for c in multiprocessing.active_children()} & {first, second}


def test_reasoning_gym_scores_without_padding_credit():
    import reasoning_gym
    [g] = make_problems("gsm", 1, seed=0)
    [b] = make_problems("basic_arithmetic", 1, seed=0)
    rg_gsm = reasoning_gym.get_score_answer_fn("gsm_symbolic")
    rg_ba = reasoning_gym.get_score_answer_fn("basic_arithmetic")
    ans, bans = g.reference, b.reference
    # reasoning-gym's own scorers credit padded and wrong answers ...
    assert rg_gsm(f"junk {ans} junk", g.meta["rg_entry"]) == 1.0
    assert rg_ba(f"{bans}0", b.meta["rg_entry"]) > 0
    # ... the wrapper does not
    assert reasoning_gym_score(g, f"junk {ans} junk") == 0.0
    assert reasoning_gym_score(b, f"{bans}0") == 0.0
    assert reasoning_gym_score(g, str(int(ans) + 1)) == 0.0
    assert reasoning_gym_score(g, f" {ans}. ") == 1.0 and reasoning_gym_score(g, f"{ans}.0") == 1.0
    res = ReasoningGymAnswer()([g, b, b], [f" {ans}\nbecause", f"{bans}0", "\n"])
    assert [(r.status, r.value) for r in res] == [("ok", 1.0), ("ok", 0.0), ("unparseable", 0.0)]


# ---- preference pairs ------------------------------------------------------------------------
def _pair_inputs():
    probs = [Problem(f"p{i}", f"prompt {i}", "code") for i in range(4)]
    texts = [[f"c{i}{j}" for j in range(5)] for i in range(4)]
    scores = [[0.0, 0.5, 1.0, 0.5, None],  # 5 ordered pairs (one tie, one unscored)
              [RewardResult(1.0, components={"passed": 3}), RewardResult(1.0, components={"passed": 2}),
               RewardResult(None, "timeout"), RewardResult(0.0, "unparseable"), 0.25],
              [0.3] * 5,  # all tied: nothing
              [0.1, 0.2, 0.3, 0.4, 0.5]]  # 10 pairs
    return probs, texts, scores


def test_preference_pairs_ties_margins_and_exact_flips():
    probs, texts, scores = _pair_inputs()
    clean = preference_pairs(probs, texts, scores, flip_fraction=0.0)
    assert len(clean) == 5 + 5 + 0 + 10  # problem 1: one tie dropped, 5 pairs among 4 scored
    assert not any(p["flipped"] for p in clean) and all(p["margin"] > 0 for p in clean)
    first = [p for p in clean if p["problem_id"] == "p0"]
    assert {(p["chosen"], p["rejected"]) for p in first} == {
        ("c01", "c00"), ("c02", "c00"), ("c03", "c00"), ("c02", "c01"), ("c02", "c03")}
    broken = preference_pairs(probs, texts, scores, tie_break="passed")
    assert ("c10", "c11", 0.0) in {(p["chosen"], p["rejected"], p["margin"]) for p in broken}
    assert len(broken) == len(clean) + 1
    for frac in (0.0, 0.1, 0.25, 1 / 3, 0.5, 1.0):
        pairs = preference_pairs(probs, texts, scores, flip_fraction=frac, seed=7)
        assert sum(p["flipped"] for p in pairs) == round(frac * len(clean))
        truth = {(p["problem_id"], frozenset((p["chosen"], p["rejected"]))): p for p in clean}
        for p in pairs:
            ref = truth[(p["problem_id"], frozenset((p["chosen"], p["rejected"])))]
            assert (p["chosen"] == ref["chosen"]) != p["flipped"]
            assert p["margin"] == ref["margin"]
        assert pairs == preference_pairs(probs, texts, scores, flip_fraction=frac, seed=7)
    assert (preference_pairs(probs, texts, scores, 0.5, seed=1)
            != preference_pairs(probs, texts, scores, 0.5, seed=2))
    sampled = preference_pairs(probs, texts, scores, max_pairs_per_problem=2)
    assert len(sampled) == 6
    with pytest.raises(ValueError, match="flip_fraction"):
        preference_pairs(probs, texts, scores, flip_fraction=1.5)


def test_pairs_jsonl_round_trip_and_malformed_lines(tmp_path):
    probs, texts, scores = _pair_inputs()
    pairs = preference_pairs(probs, texts, scores, flip_fraction=0.25, seed=3)
    pairs[0]["chosen"] = "unicode: λ \"quoted\"\nnewline"
    path = write_pairs_jsonl(tmp_path / "sub" / "pairs.jsonl", pairs)
    assert read_pairs_jsonl(path) == pairs
    assert sorted(os.listdir(path.parent)) == ["pairs.jsonl"]  # no temporary file left behind
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(pairs) and all(json.loads(x)["prompt"] for x in lines)
    for bad, why in [('{"prompt": "p", "chosen": "a"', "not valid JSON"),
                     ('{"prompt": "p", "chosen": "a", "rejected": "b", "flipped": false}',
                      "missing key.*margin"),
                     ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -1, '
                      '"flipped": false}', "margin"),
                     ('{"prompt": "p", "chosen": 3, "rejected": "b", "margin": 1, '
                      '"flipped": false}', "'chosen' must be str"),
                     ('[1, 2]', "expected a JSON object")]:
        broken = tmp_path / "broken.jsonl"
        broken.write_text("\n".join(lines[:2] + [bad] + lines[2:]) + "\n", encoding="utf-8")
        with pytest.raises(PairFileError, match=f"broken.jsonl:3: .*{why}"):
            read_pairs_jsonl(broken)
    with pytest.raises(PairFileError, match="preference pair 1: missing key"):
        write_pairs_jsonl(tmp_path / "x.jsonl", [pairs[0], {"prompt": "p"}])
    assert not (tmp_path / "x.jsonl").exists()
