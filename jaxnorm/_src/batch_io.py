"""A batch of outputs as the hook's jitted calls take it, and their results back.

Each key is checked (``validation.as_array``, ``ragged.check_boxes``); ``box_scores`` are
concatenated on the host and padded (``ragged``); a batch of a new, odd leading size is
padded to its bucket (``batching``), unless its caller padded it and says how many rows are
real (``valid_rows``). Results come back in the caller's layout: unpadded, and box scores
split per image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from jaxnorm._src import batching, ragged, validation
from jaxnorm._src.f1_inputs import as_labels


def validation_arrays(
    outputs: Mapping,
    keys: Iterable[str],
    buckets: batching.Buckets,
    valid_rows: int | None,
    labels: Mapping[str, str] | None = None,
) -> tuple[dict, dict]:
    """``(values, rows)`` for ``fold.fold``: the arrays of ``keys``, and the int32 number of
    real rows (entries, for box scores) of each padded one.

    Args:
      labels: ``{label key: its scores' key}`` for the F1 thresholds' labels among ``keys``
        (bool arrays allowed): each is padded as its scores are, so that both keep one
        label per score.
    """
    labels = labels or {}
    values, rows = {}, {}
    for key in keys:
        if key == "box_scores":
            padded, lengths = ragged.concat_padded(ragged.check_boxes(key, outputs[key]))
            values[key], rows[key] = padded, np.int32(sum(lengths))
            continue
        if key in labels:
            x = as_labels(key, outputs[key])
        else:
            x = validation.as_array(key, outputs[key])
        if valid_rows is not None:
            values[key], rows[key] = x, np.int32(validation.check_rows(key, x, valid_rows))
            continue
        values[key], n = buckets.pad(batching.VALIDATION, labels.get(key, key), x, sized=True)
        if n is not None:
            rows[key] = np.int32(n)
    return values, rows


class NormalizeArrays:
    """One test or predict batch on its way through ``fused.normalize_all`` and back.

    Attributes:
      values: the arrays to normalize, by key (box scores concatenated and padded).
    """

    def __init__(
        self,
        outputs: Mapping,
        keys: Iterable[str],
        buckets: batching.Buckets,
        valid_rows: int | None,
    ) -> None:
        self.outputs = outputs
        self.values: dict = {}
        self._unpad: dict = {}
        self._lengths = None
        for key in keys:
            if key == "box_scores":
                boxes = ragged.check_boxes(key, outputs[key])
                self.values[key], self._lengths = ragged.concat_padded(boxes)
                continue
            x = validation.as_array(key, outputs[key])
            if valid_rows is not None:
                validation.check_rows(key, x, valid_rows)
                self.values[key] = x
                continue
            self.values[key], n = buckets.pad(batching.NORMALIZE, key, x)
            if n is not None:
                self._unpad[key] = n

    def results(self, normalized: Mapping, *, boxes_on_host: bool) -> dict:
        """A copy of the outputs with each key's normalized result, in the key's layout."""
        out = dict(self.outputs)
        for key in self.values:
            y = normalized[key]
            if key == "box_scores":
                split = ragged.split_host if boxes_on_host else ragged.split
                out[key] = split(y, self._lengths, self.outputs[key])
            elif key in self._unpad:
                out[key] = batching.unpad(y, self._unpad[key], self.outputs[key])
            else:
                out[key] = y
        return out
