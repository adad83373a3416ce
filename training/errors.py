"""The one error a training run reports to its user."""


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""
