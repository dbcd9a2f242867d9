"""Errors jaxnorm raises, each naming what is wrong and what to do next."""

from __future__ import annotations

# anomalib's exact text, kept for parity.
NO_VALUES_MESSAGE = (
    "No values found for normalization, provide anomaly maps, bbox scores, or image scores"
)


class StatisticsMissingError(RuntimeError):
    """Normalization was asked for before any statistics were collected or loaded."""


class NonFiniteScoresError(ValueError):
    """Validation outputs held NaN or infinite scores under ``nonfinite="raise"``.

    Attributes:
      key: the output key that held them.
      count: how many values were not finite.
    """

    def __init__(self, key: str, count: int, where: str = "") -> None:
        self.key = key
        self.count = count
        super().__init__(
            f"{count} non-finite value(s) (NaN or inf) in validation output '{key}'{where}; "
            "the statistics were left as they were before this batch. Fix the model's "
            "outputs, or pass nonfinite='omit' to skip non-finite values."
        )
