"""jaxnorm._src.persistence: the hook's state dict and JSON metadata, and their checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxnorm
from jaxnorm._src import persistence

HUGE = 10**400  # 401 digits: beyond float64, so float() overflows


@pytest.mark.parametrize("key", ["min", "max"])
def test_from_json_with_a_huge_integer_names_the_key(key):
    meta = {"image_threshold": 0.5, "pixel_threshold": 0.5, "min": 0, "max": 1}
    meta[key] = HUGE if key == "max" else -HUGE
    text = json.dumps(meta)
    assert len(str(HUGE)) == 401 and str(HUGE) in text
    with pytest.raises(ValueError, match=f"metadata: '{key}' is .*float"):
        jaxnorm.MinMaxNormalizationHook.from_json(text)


def test_separate_metadata_with_a_huge_integer_names_its_key():
    text = json.dumps({"pred_scores.min": 0, "pred_scores.max": 1, "anomaly_maps.min": 0})
    text = text[:-1] + f', "anomaly_maps.max": {HUGE}}}'
    with pytest.raises(ValueError, match="metadata: 'anomaly_maps.max' is"):
        jaxnorm.MinMaxNormalizationHook.from_json(text)


def test_load_state_dict_with_a_huge_integer_names_the_key_and_changes_nothing():
    hook = jaxnorm.MinMaxNormalizationHook()
    hook.set_stats(jaxnorm.MinMax(min=np.float32(1.0), max=np.float32(2.0)))
    state = {
        "stats": {"image": {"min": 0, "max": HUGE}, "pixel": {"min": 0, "max": 1}},
        "image_threshold": 0.5,
        "pixel_threshold": 0.5,
    }
    with pytest.raises(ValueError, match=r"state: 'stats.image.max' is"):
        hook.load_state_dict(state)
    assert hook.host_stats()["image"] == (1.0, 2.0)


def test_a_huge_threshold_in_json_names_the_key():
    text = json.dumps({"image_threshold": HUGE, "min": 0.0, "max": 1.0})
    with pytest.raises(ValueError, match="metadata 'image_threshold'.*float64"):
        jaxnorm.MinMaxNormalizationHook.from_json(text)


def test_the_hook_saves_and_loads_through_the_persistence_conversions():
    """persistence converts a Snapshot and never sees the hook: what the hook writes is the
    conversion of its snapshot, and loading the conversion restores it."""
    hook = jaxnorm.MinMaxNormalizationHook(stats="separate", image_threshold=0.25)
    hook.on_validation_batch_end(
        {"pred_scores": np.array([1.0, 3.0], np.float32), "anomaly_maps": np.zeros((1, 2, 2))}
    )
    hook.on_validation_epoch_end()
    snap = persistence.from_json(hook.to_json())
    assert snap.stats_mode == "separate"
    assert snap.stats == {"image": (1.0, 3.0), "pixel": (0.0, 0.0)}
    assert snap.thresholds == {"image": 0.25, "pixel": 0.5}
    assert persistence.to_metadata(snap) == hook.metadata()
    assert persistence.to_json(snap) == hook.to_json()
    restored = persistence.from_state_dict(hook.state_dict())
    assert restored.stats == hook.host_stats()
    assert restored.num_values == hook.num_values == {"image": 2, "pixel": 4}
    assert persistence.to_state_dict(restored, hook.stats).keys() == hook.state_dict().keys()
    other = jaxnorm.MinMaxNormalizationHook()
    other.load_json(hook.to_json())
    assert other.stats_mode == "separate" and other.host_stats() == hook.host_stats()
