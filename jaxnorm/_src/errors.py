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


def statistics_missing(which: str, shared: bool, omitted: int) -> StatisticsMissingError:
    """The error for test or predict batches whose ``which`` statistics are empty.

    Args:
      which: ``"image"`` or ``"pixel"``.
      shared: one statistic serves both (the message then names neither).
      omitted: how many validation scores ``nonfinite="omit"`` left out of them.
    """
    label = "" if shared else f"{which} "
    if omitted:
        return StatisticsMissingError(
            f"no {label}normalization statistics: validation ran, but all {omitted} of its "
            "scores were NaN or infinite and nonfinite='omit' left them out; fix the model's "
            "outputs (or load statistics with load_state_dict, load_json, set_stats) before "
            "test or predict; normalizing now would turn every score into 0.5."
        )
    source = "'pred_scores'" if which == "image" else "'anomaly_maps' or 'box_scores'"
    seen = "" if shared else " (validation outputs had no " + source + ")"
    return StatisticsMissingError(
        f"no {label}normalization statistics{seen}: run validation "
        "(on_validation_batch_end) or load statistics (load_state_dict, "
        "load_json, set_stats) before test or predict; normalizing now would "
        "turn every score into 0.5."
    )
