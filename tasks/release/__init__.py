"""Release: what happens to a trained model: export, model card, champion gate, predictions, report.

May import: every other room of tasks/.
"""
