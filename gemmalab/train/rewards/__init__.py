"""Rewards for RL: verifiable task rewards (code tests in the sandbox, answers checked in a worker
process), reward models, and how terms combine. Never imports the trainer.

    base       Problem, RewardResult, the Reward protocol, RewardCache
    combine    weighted sum, per-term normalisation, the Inada transform (Maura-Rivero et al. 2025)
    tasks      procedural task families with held-out template splits (code, sort, next_number, add,
               reasoning-gym's gsm_symbolic and basic_arithmetic), HumanEval for evaluation
    verifiers  CodeTests (gemmalab.sandbox), AnswerMatch (graded), MathAnswer (math-verify in a
               killable worker process), ReasoningGymAnswer (its scorer without padding credit)
    pairs      preference pairs synthesised from verifier scores, with flipped labels (WARM)
    model      a Bradley-Terry reward model (scalar head) as a Reward term

Import the submodules directly (`from gemmalab.train.rewards.tasks import make_problems`): they load
their optional dependencies (reasoning-gym, math-verify, the sandbox) only when used.
"""
from .base import SCORED, STATUSES, Problem, Reward, RewardCache, RewardResult, failed

__all__ = ["SCORED", "STATUSES", "Problem", "Reward", "RewardCache", "RewardResult", "failed"]
