"""Settings for the anomalib 0.7 integration test, made before torch is imported.

torch >= 2.6 loads checkpoints with ``weights_only=True``, which refuses anomalib's (they hold
omegaconf objects), whichever normalization callback wrote them. anomalib 0.7 users need
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (or ``weights_only=False``); so does this test.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
# No weights can be downloaded here; fail at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
