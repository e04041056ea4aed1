"""HumanEval pass@k: the estimator, the check programs in the sandbox, the CLI end to end."""
import json
import math
import os
import subprocess
import sys

import pytest

from gemmalab.cli import main
from gemmalab.eval import humaneval as he
from gemmalab.sandbox import Sandbox

from .distill_helpers import tiny_teacher_gguf

STATUSES = {"passed", "failed", "timeout", "memory", "output_limit", "killed", "crash"}


@pytest.fixture(scope="module")
def box():
    return Sandbox(cpu_s=3, wall_s=10, mem_mb=1024)


@pytest.fixture(scope="module")
def problems():
    return {p["task_id"]: p for p in he.load_problems()}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return tiny_teacher_gguf(tmp_path_factory.mktemp("humaneval") / "tiny.gguf")


# ---- the estimator ----------------------------------------------------------------------
def test_pass_at_k_matches_the_closed_form():
    for n in range(1, 31):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert he.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    for n, c, k in [(200, 0, 100), (200, 1, 1), (200, 3, 100), (200, 199, 100), (1000, 17, 10)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # exact integers, then one division
        assert he.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_pass_at_k_edges_and_errors():
    assert he.pass_at_k(1, 0, 1) == 0.0 and he.pass_at_k(1, 1, 1) == 1.0
    assert he.pass_at_k(10, 0, 10) == 0.0
    assert he.pass_at_k(10, 1, 10) == 1.0  # fewer than k failures: some k-subset passes
    assert he.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the pass rate
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        he.pass_at_k(4, 1, 5)
    for bad in [(0, 0, 1), (3, 4, 1), (3, -1, 1), (3, 1, 0)]:
        with pytest.raises(ValueError):
            he.pass_at_k(*bad)


# ---- problems, programs, verdicts -------------------------------------------------------
def test_problem_subsets():
    assert len(he.load_problems()) == he.N_PROBLEMS == 164
    sub = he.load_problems(offset=160, count=10)
    assert [p["task_id"] for p in sub] == [f"HumanEval/{i}" for i in range(160, 164)]
    with pytest.raises(ValueError, match="--offset must be in"):
        he.load_problems(offset=164)
    with pytest.raises(ValueError, match="--problems must be >= 1"):
        he.load_problems(count=0)


def test_truncate_at_the_earliest_stop():
    body = "    return x + 1\n"
    assert he.truncate(body + "\ndef other():\n    pass\n") == body
    assert he.truncate(body + "\n\n# test\nprint(f(1))\n") == body + "\n"
    inline = "    y = x  # a comment\n    return y\n    # indented comment\n"
    assert he.truncate(inline + "#x") == inline[:-1]  # only a top-level "\n#" stops
    assert he.truncate(body + "\nif __name__ == '__main__':\n    f()") == body
    assert he.truncate(body + "\nclass A:\n    pass\n\nprint(1)") == body
    assert he.truncate(body + "    def inner():\n        pass\n") == body + "    def inner():\n        pass\n"
    assert he.truncate(body) == body


def test_canonical_solutions_pass_and_wrong_ones_fail(problems, box):
    for tid in ["HumanEval/0", "HumanEval/2", "HumanEval/32", "HumanEval/53", "HumanEval/100",
                "HumanEval/163"]:
        v = he.check(problems[tid], problems[tid]["canonical_solution"], box)
        assert v["passed"] and v["status"] == "passed", (tid, v)
    p0 = problems["HumanEval/0"]
    wrong = he.check(p0, "    return False\n", box)
    assert not wrong["passed"] and wrong["status"] == "failed" and "AssertionError" in wrong["detail"]
    broken = he.check(p0, "    return (\n", box)
    assert broken["status"] == "failed" and "SyntaxError" in broken["detail"]


def test_reward_hacks_fail(problems, box):
    p = problems["HumanEval/53"]  # add(x, y)
    hacks = {
        "os._exit before the asserts": "    import os\n    os._exit(0)\n",
        "sys.exit(0) at import": "    return 0\nimport sys\nsys.exit(0)\n",
        "always-equal object": ("    class A:\n        def __eq__(s, o): return True\n"
                                "    return A()\n"),  # passes `assert candidate(..) == ..`
        "infinite loop": "    while True:\n        pass\n",
    }
    verdicts = {name: he.check(p, code, box) for name, code in hacks.items()}
    assert not verdicts["os._exit before the asserts"]["passed"]
    assert not verdicts["sys.exit(0) at import"]["passed"]
    assert verdicts["infinite loop"]["status"] == "timeout"
    # An object whose __eq__ is always True does pass HumanEval's own `assert f(x) == y` tests;
    # that is the benchmark's weakness (why rewards compare plain values outside the box with
    # Sandbox.run_calls), and pinned here so the metric's meaning stays documented.
    assert verdicts["always-equal object"]["passed"]
    calls = box.run_calls(p["prompt"] + hacks["always-equal object"], "add", [[2, 3]])
    assert not calls[0].matches(5) and "TypeError" in calls[0].error


# ---- generation + report ----------------------------------------------------------------
def test_evaluate_on_a_tiny_model_sampled_and_reproducible(tiny_gguf, problems, box):
    import gemmalab
    lm = gemmalab.load(tiny_gguf, mode="fp32")
    subset = [problems["HumanEval/3"], problems["HumanEval/4"]]
    kw = dict(n=3, k=[1, 2], temperature=0.8, top_p=0.95, seed=7, max_new_tokens=12, sandbox=box,
              progress=False)
    r = he.evaluate(lm, subset, **kw)
    again = he.evaluate(lm, subset[1:], **kw)  # a subset gives the same samples as the full run
    assert [s["completion"] for s in again["results"][0]["samples"]] == \
        [s["completion"] for s in r["results"][1]["samples"]]
    completions = [s["completion"] for s in r["results"][0]["samples"]]
    assert len(set(completions)) > 1  # sampled, not greedy
    assert r["settings"]["k"] == [1, 2] and r["summary"]["samples"] == 6
    for res in r["results"]:
        assert res["n"] == 3 and 0 <= res["c"] <= 3 and len(res["samples"]) == 3
        assert res["pass@1"] == he.pass_at_k(3, res["c"], 1)
        for s in res["samples"]:
            assert s["status"] in STATUSES and s["tokens"] <= 12
            assert he.truncate(s["completion"]) == s["completion"]
    assert set(r["summary"]["statuses"]) <= STATUSES
    md = he.markdown(r)
    assert "| pass@1 | pass@2 |" in md and "HumanEval/4" in md
    with pytest.raises(ValueError, match="greedy decoding gives 3 identical samples"):
        he.evaluate(lm, subset, n=3, temperature=0, sandbox=box, progress=False)
    with pytest.raises(ValueError, match="pass@10 needs n >= 10"):
        he.evaluate(lm, subset, n=3, k=[1, 10], temperature=0.8, sandbox=box, progress=False)


def test_cli_end_to_end_on_a_tiny_model(tiny_gguf, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "gemmalab", "eval", "humaneval", "--model", str(tiny_gguf),
         "--mode", "fp32", "--problems", "2", "--offset", "10", "--max-new-tokens", "16",
         "--out", str(out), "--json", "--no-progress"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["benchmark"] == "humaneval" and r["mode"] == "fp32"
    assert r["problems"] == {"count": 2, "first": "HumanEval/10", "last": "HumanEval/11", "of": 164}
    assert r["settings"]["n"] == 1 and r["settings"]["k"] == [1] and r["settings"]["temperature"] == 0
    assert [x["task_id"] for x in r["results"]] == ["HumanEval/10", "HumanEval/11"]
    assert all(s["status"] in STATUSES for x in r["results"] for s in x["samples"])
    assert 0.0 <= r["summary"]["pass@1"] <= 1.0
    assert r["sandbox"]["backend"] in ("bwrap", "rlimit") and r["machine"]["cpu"]
    on_disk = json.loads((out / "humaneval.json").read_text())
    assert on_disk["results"] == r["results"]
    md = (out / "humaneval.md").read_text()
    assert md.startswith("# HumanEval: tiny") and "| HumanEval/10 |" in md


def test_cli_bad_inputs_are_one_clear_error(tmp_path, capsys):
    assert main(["eval", "humaneval", "--model", str(tmp_path / "none.gguf")]) == 1
    assert "gemmalab: error: model not found" in capsys.readouterr().err
    assert main(["eval", "humaneval", "--n", "2", "--k", "1,10", "--temperature", "0.8"]) == 1
    assert "gemmalab: error: pass@10 needs n >= 10" in capsys.readouterr().err
    assert main(["eval", "humaneval", "--n", "4"]) == 1
    assert "greedy decoding gives 4 identical samples" in capsys.readouterr().err
    assert main(["eval", "humaneval", "--offset", "200"]) == 1
    assert "--offset must be in [0, 164)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "humaneval", "--mode", "fp16"])
    assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "humaneval", "--k", "1,x"])
    assert "--k takes comma-separated integers" in capsys.readouterr().err


@pytest.mark.slow
def test_real_270m_greedy_on_two_problems(box, problems, tmp_path):
    import gemmalab
    lm = gemmalab.load()  # the embedded Gemma 3 270M
    r = he.evaluate(lm, [problems["HumanEval/0"], problems["HumanEval/2"]], max_new_tokens=24,
                    sandbox=box, progress=False)
    assert r["settings"]["temperature"] == 0 and r["summary"]["samples"] == 2
    for res in r["results"]:
        s = res["samples"][0]
        assert s["status"] in STATUSES and s["completion"].strip()
        assert s["completion"].startswith("    ")  # a function body, continuing the docstring
    assert r["summary"]["tokens_per_second"] > 0
