"""Fuzzing the training-config loader (TOML / YAML / JSON files, `section.key=value` overrides) and the
regressions it found: each input gives a ConfigError with a one-line message, nothing else."""
from __future__ import annotations

import pytest

from gemmalab.train.config import (ConfigError, apply_overrides, build_config, load_config, load_distill_config,
                                   load_qat_config, read_config_file)
from tests.fuzz_helpers import run_fuzz

LOADERS = {"sft": load_config, "distill": load_distill_config, "qat": load_qat_config}


def test_fuzz_config(tmp_path):
    stats = run_fuzz("config", tmp_path, runs=2000, seconds=45)
    assert stats["outcomes"].get("ok", 0) > 0  # the seeds (valid configs) still load


def one_line_error(fn, *args, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as e:
        fn(*args)
    msg = str(e.value)
    assert msg.strip() and "\n" not in msg, msg
    return msg


ALIAS_BOMB = b"a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
    b"a%d: &a%d [%s]\n" % (i, i, b", ".join([b"*a%d" % (i - 1)] * 10)) for i in range(1, 9))

# (suffix, file bytes, overrides, loader, message): what the reader raised before is in the comment.
CASES = [
    (".toml", b'[run]\nout_dir = "\xff"\n', [], "sft", r"c.toml: not UTF-8 text \(invalid start byte at byte 17\)"),  # UnicodeDecodeError
    (".json", b"{", [], "sft", r"c.json: invalid JSON: Expecting property name .*line 1 column 2"),  # JSONDecodeError
    # the fuzzer's first YAML input: PyYAML's message spans two lines
    (".yaml", b"data:\x08  train: [a.jsonl, b.parquet]\n", [], "sft", r"c.yaml: unacceptable character #x0008"),
    (".yaml", b"a: [1\nb: 2\n", [], "sft", r"c.yaml: while parsing a flow sequence: expected ',' or '\]', "
                                            r"but got ':' \(line 2, column 2\)"),
    (".json", b"[1]", [], "sft", r"c.json: a config must be a table of sections, not list"),  # unknown section [1]
    (".yaml", b"- data\n", [], "qat", r"a config must be a table of sections, not list"),
    (".yaml", b"run: {out_dir: 2024-01-01}\n", [], "sft", r"not a string, number, boolean, list or table"),  # TypeError
    (".toml", b"[run]\nout_dir = 1979-05-27\n", [], "sft", r"not a string, number, boolean, list or table"),  # TypeError
    (".yaml", ALIAS_BOMB, [], "sft", r"more than 100000 values"),  # 10^9 values once copied
    (".yaml", b"a: &a [*a]\n", [], "sft", r"nested more than 32 levels"),  # ValueError: Circular reference
    (".json", b"[" * 100_000, [], "sft", r"c.json: invalid JSON \(nested too deeply\)"),  # RecursionError
    (".toml", b"a = " + b"[" * 5000, [], "sft", r"c.toml: invalid TOML \(nested too deeply\)"),  # RecursionError
    (".json", b'{"model": {"arch": ' + b'{"a": ' * 40 + b"1" + b"}" * 42, [], "sft", r"nested more than 32 levels"),
    (".toml", b"[run]\nsteps = " + b"1" * 5000, [], "sft", r"c.toml: invalid TOML \(Exceeds the limit"),  # ValueError
    (".yaml", b"distill: {hard_weight: 0x" + b"f" * 5000 + b"}\n", [], "distill", r"not a string, number"),  # ValueError
    (".toml", b"model = 5\n", ["model.path=x"], "sft", r"override 'model.path=x': \[model\] is 5, not a table"),  # TypeError
    (".toml", b"", ["run.steps=" + "1" * 5000], "sft", r"override 'run.steps=1111.*\.\.\.: Exceeds the limit"),  # ValueError
    (".toml", b"", ["run.steps=" + "[" * 100_000], "sft", r"the value is nested too deeply"),  # RecursionError
    (".json", b'{"distill": {"k": null, "store": "s"}}', [], "distill", r"distill.k must be a int, not null"),  # TypeError
    (".json", b'{"qat": {"modules": [{}]}}', [], "qat", r"qat.modules must be a list of strings, got \[\{\}\]"),  # TypeError
    (".json", b'{"optim": {"betas": [0.9]}}', [], "sft", r"optim.betas must be a list of 2 numbers"),
    (".json", b'{"model": {"path": 5}}', [], "qat", r"model.path must be a string, got 5"),
    (".json", b'{"data": {"train": "a.jsonl"}}', [], "sft", r"data.train must be a list"),
]


@pytest.mark.parametrize("suffix, body, overrides, loader, match", CASES)
def test_bad_config_is_a_one_line_config_error(tmp_path, suffix, body, overrides, loader, match):
    path = tmp_path / f"c{suffix}"
    path.write_bytes(body)
    one_line_error(LOADERS[loader], path, overrides, match=match)


def test_big_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "c.toml"
    with open(path, "wb") as f:
        f.truncate(64 << 20)  # sparse: costs no disk
    one_line_error(read_config_file, path, match=r"c.toml: 67108864 bytes; a config file is at most 1048576")


def test_direct_callers_get_config_errors(tmp_path):
    one_line_error(build_config, [1], match="a config must be a table of sections, not list")
    one_line_error(build_config, {1: {}, "x": {}}, match=r"unknown config section\(s\) \[1, 'x'\]")
    one_line_error(apply_overrides, {"run": {}}, [3], match="must be a string section.key=value")
    one_line_error(apply_overrides, {"run": {}}, ["run=3"], match="must look like section.key=value")


def test_valid_configs_load_as_before(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\ntrain = ["x.jsonl"]\n[optim]\nbetas = [0.9, 0.95]\n[model]\narch = {hidden_size = 64}\n')
    cfg = load_config(toml, ["optim.lr=0.5", "run.steps=7", "model.preset=tiny"])
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.lr == 0.5 and cfg.run.steps == 7
    assert cfg.model.arch == {"hidden_size": 64} and cfg.model.preset == "tiny"
    yaml = tmp_path / "c.yaml"
    yaml.write_text("distill:\n  store: s/\n  k: 16.0\n")  # an integral float for an int field: the int
    d = load_distill_config(yaml)
    assert d.distill.k == 16 and isinstance(d.distill.k, int)
    empty = tmp_path / "e.yaml"
    empty.write_text("")
    assert read_config_file(empty) == {}
    # null stays allowed where the default is null (an optional path)
    q = load_qat_config(None, ["model.path=null", "data.train=[\"a.jsonl\"]"])
    assert q.model.path is None and q.distill.teacher is None
