"""The normalization statistics, and which output key feeds them.

``NormalizationStats`` holds the image and pixel ``MinMax``; ``stats_sources`` is the routing
of anomalib's callback (which key feeds which statistics, and so which threshold applies to
which key), kept in one place: the Flax hook, ``update_stats`` and the Lightning adapters all
use it.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.struct
import jax.numpy as jnp

from jaxnorm._src import errors
from jaxnorm._src.minmax import MinMax
from jaxnorm._src.validation import StatsMode, check_stats_mode

IMAGE = "image"
PIXEL = "pixel"

# The statistic each normalized key uses, and so its threshold (image or pixel).
NORMALIZED_KEYS: Mapping[str, str] = {
    "pred_scores": IMAGE,
    "anomaly_maps": PIXEL,
    "box_scores": PIXEL,
}


def stats_sources(outputs: Mapping, stats: StatsMode) -> list[tuple[tuple[str, ...], str]]:
    """Returns ``[(statistics to update, output key), ...]`` for one validation batch.

    ``"shared"`` (anomalib 0.x): one statistic for both, from ``anomaly_maps``, else
    ``box_scores``, else ``pred_scores``. ``"separate"`` (anomalib >= 1.1.1): image statistics
    from ``pred_scores``, pixel statistics from ``anomaly_maps``, else ``box_scores``.

    Raises:
      ValueError: with anomalib's message, when no key is present.
    """
    if not isinstance(outputs, Mapping):
        raise ValueError(
            f"outputs: expected a dict of model outputs, got {type(outputs).__name__}."
        )
    if stats == "shared":
        for key in ("anomaly_maps", "box_scores", "pred_scores"):
            if key in outputs:
                return [((IMAGE, PIXEL), key)]
    else:
        sources = []
        if "pred_scores" in outputs:
            sources.append(((IMAGE,), "pred_scores"))
        for key in ("anomaly_maps", "box_scores"):
            if key in outputs:
                sources.append(((PIXEL,), key))
                break
        if sources:
            return sources
    raise ValueError(errors.NO_VALUES_MESSAGE)


def mode_after_load(mode: StatsMode, host: Mapping[str, tuple[float, float]]) -> StatsMode:
    """The statistics mode of a hook that loaded ``host`` statistics: image and pixel
    statistics that differ make a shared hook separate (shared mode folds, saves and exports
    one pair, and would drop the pixel statistics)."""
    return "separate" if host[IMAGE] != host[PIXEL] else mode


@flax.struct.dataclass
class NormalizationStats:
    """Image and pixel statistics. With shared statistics both fields hold the same values.

    Attributes:
      image: the ``MinMax`` that ``pred_scores`` are normalized with.
      pixel: the ``MinMax`` that ``anomaly_maps`` and ``box_scores`` are normalized with.
    """

    image: MinMax
    pixel: MinMax

    @classmethod
    def empty(cls) -> NormalizationStats:
        """Both statistics empty: what ``update_stats`` starts from."""
        return cls(image=MinMax.empty(), pixel=MinMax.empty())

    def merge(self, other: NormalizationStats) -> NormalizationStats:
        """The statistics that have seen what ``self`` and ``other`` saw."""
        if not isinstance(other, NormalizationStats):
            raise TypeError(
                f"NormalizationStats.merge: expected a NormalizationStats, got "
                f"{type(other).__name__}; wrap a MinMax m as NormalizationStats(m, m)."
            )
        return NormalizationStats(self.image.merge(other.image), self.pixel.merge(other.pixel))

    def reduce(self, axis_name=None) -> NormalizationStats:
        """See ``MinMax.reduce``: across a named axis, or a stacked leading axis."""
        return NormalizationStats(self.image.reduce(axis_name), self.pixel.reduce(axis_name))

    def get(self, which: str) -> MinMax:
        """The ``MinMax`` of ``which``: ``"image"`` or ``"pixel"``."""
        if which == IMAGE:
            return self.image
        if which == PIXEL:
            return self.pixel
        raise ValueError(f"which={which!r}: expected {IMAGE!r} or {PIXEL!r}.")


def as_stats(stats, where: str) -> NormalizationStats:
    """``stats`` as ``NormalizationStats``; a ``MinMax`` is shared by image and pixel."""
    if isinstance(stats, MinMax):
        return NormalizationStats(image=stats, pixel=stats)
    if not isinstance(stats, NormalizationStats):
        raise ValueError(
            f"{where}: stats is a {type(stats).__name__}; expected jaxnorm.NormalizationStats "
            "(start from NormalizationStats.empty()) or a jaxnorm.MinMax."
        )
    return stats


def update_stats(
    stats: NormalizationStats, outputs: Mapping, *, mode: StatsMode = "shared"
) -> NormalizationStats:
    """Folds one validation batch into ``stats``: pure and jittable.

    The functional twin of ``MinMaxNormalizationHook.on_validation_batch_end``, to fold the
    statistics inside your own jitted eval step. Non-finite values are skipped. Inside ``jit``
    a ``box_scores`` list is concatenated as traced, so its lengths are part of the compiled
    shape; the hook buckets them instead.
    """
    if not isinstance(stats, NormalizationStats):
        raise ValueError(
            f"update_stats: stats is a {type(stats).__name__}; expected "
            "jaxnorm.NormalizationStats (start from NormalizationStats.empty(); fold a single "
            "MinMax with MinMax.update)."
        )
    new = {IMAGE: stats.image, PIXEL: stats.pixel}
    for which, key in stats_sources(outputs, check_stats_mode(mode)):
        values = outputs[key]
        if key == "box_scores":
            parts = [jnp.ravel(b) for b in values]
            values = jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)
        folded = new[which[0]].update(values)
        for w in which:
            new[w] = folded
    return NormalizationStats(image=new[IMAGE], pixel=new[PIXEL])
