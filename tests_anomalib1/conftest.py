"""Settings for the anomalib 1.x integration test, made before anomalib is imported."""

from __future__ import annotations

import os

# No weights can be downloaded here; fail at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
