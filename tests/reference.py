"""Independent numpy reference of anomalib's min-max normalization (SPEC sections 1 and 2).

Written from the spec, not from jaxnorm: the tests compare jaxnorm against these functions.
"""

from __future__ import annotations

import numpy as np

NO_VALUES_MESSAGE = (
    "No values found for normalization, provide anomaly maps, bbox scores, or image scores"
)


def normalize(targets, threshold, min_val, max_val):
    """clip((targets - threshold) / (max - min) + 0.5, 0, 1); a zero range gives 0 / 0.5 / 1."""
    t = np.asarray(targets, dtype=np.float64)
    threshold, min_val, max_val = float(threshold), float(min_val), float(max_val)
    if max_val == min_val:
        return np.where(t < threshold, 0.0, np.where(t > threshold, 1.0, 0.5))
    return np.clip((t - threshold) / (max_val - min_val) + 0.5, 0.0, 1.0)


def min_max(*batches):
    """min and max over the concatenation of every batch."""
    flat = np.concatenate([np.asarray(b, np.float64).ravel() for b in batches])
    return flat.min(), flat.max()


def stats_source(outputs):
    """The values a validation batch contributes (anomaly_maps, else boxes, else scores)."""
    if "anomaly_maps" in outputs:
        return np.asarray(outputs["anomaly_maps"], np.float64).ravel()
    if "box_scores" in outputs:
        return np.concatenate([np.asarray(b, np.float64).ravel() for b in outputs["box_scores"]])
    if "pred_scores" in outputs:
        return np.asarray(outputs["pred_scores"], np.float64).ravel()
    raise ValueError(NO_VALUES_MESSAGE)


def normalize_batch(outputs, image_threshold, pixel_threshold, min_val, max_val):
    """The test/predict rewrite: image threshold for pred_scores, pixel for maps and boxes."""
    out = dict(outputs)
    out["pred_scores"] = normalize(outputs["pred_scores"], image_threshold, min_val, max_val)
    if "anomaly_maps" in outputs:
        out["anomaly_maps"] = normalize(outputs["anomaly_maps"], pixel_threshold, min_val, max_val)
    if "box_scores" in outputs:
        out["box_scores"] = [
            normalize(b, pixel_threshold, min_val, max_val) for b in outputs["box_scores"]
        ]
    return out
