"""Evaluation: perplexity, long-context probes, HumanEval and an lm-evaluation-harness backend.

`gemmalab eval COMMAND` runs them (`COMMANDS` names the modules; each has `add_cli(subparsers)`
registering its subcommand with `func=`). This package never imports `gemmalab.train`.
"""
COMMANDS = ("perplexity", "long_context", "harness", "humaneval",)
