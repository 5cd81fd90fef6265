"""Release: what happens to a trained model: export, model card, champion gate, predictions, report.

The run's report and a sweep's are documents rendered by one pair of templates (`document`).
Around it, the loop that keeps the model honest: the gate's significance test, the label
review, what to label next and drift in batch scoring, and the folder watcher.

May import: every other room of tasks/.
"""
