"""deployments/prefect.yaml, shipped with tnflow so that `tnflow serve` finds it from any install."""
