"""Rewards for RL: verifiable task rewards (code tests in the sandbox, answers checked in a worker
process), reward models, and how terms combine. Never imports the trainer.

    base       Problem, RewardResult, the Reward protocol, RewardCache
    combine    weighted sum, per-term normalisation, the Inada transform (Maura-Rivero et al. 2025)
    tasks      procedural task families with held-out template splits, HumanEval
    verifiers  code tests (gemmalab.sandbox), math answers (math-verify in a killable worker)
    model      a Bradley-Terry reward model as a Reward term
"""
from .base import SCORED, STATUSES, Problem, Reward, RewardCache, RewardResult, failed

__all__ = ["SCORED", "STATUSES", "Problem", "Reward", "RewardCache", "RewardResult", "failed"]
