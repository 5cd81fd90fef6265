"""Sweeps: where trials come from (a plan, or an Optuna study), trials as flow runs (of a deployment, or
subflows), their leaderboard, the winner and its report.

May import: every other room of tasks/.
"""
