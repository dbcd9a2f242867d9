"""``F1AdaptiveThresholdMetric``: ``jaxnorm.F1AdaptiveThreshold`` as a ``flax.nnx.Metric``."""

from __future__ import annotations

from flax import nnx

from jaxnorm._src import placement
from jaxnorm._src.compat import set_variable
from jaxnorm._src.f1_state import DEFAULT_SLOTS, F1AdaptiveThreshold
from jaxnorm._src.nnx_metric import read_mask

# The state's array fields, each held in a MetricState variable of the same name.
_FIELDS = (
    "counts",
    "n_values",
    "n_nonfinite",
    "bin_min",
    "bin_max",
    "slot_bins",
    "slot_complete",
    "fine",
    "buf_keys",
    "buf_codes",
    "buf_fill",
)


class F1AdaptiveThresholdMetric(nnx.Metric):
    """anomalib's F1 adaptive threshold, as an ``nnx.Metric`` for ``nnx.MultiMetric``.

    A thin view of ``jaxnorm.F1AdaptiveThreshold`` in its bounded mode (fixed-size
    state, so ``update`` runs inside ``nnx.jit``): ``update`` folds scores and labels,
    ``compute`` returns the threshold (float32), ``reset`` forgets. The threshold is
    anomalib's whenever the state's slots cover the bins where the best F1 can lie;
    ``compute_with_bound`` says whether they did (``max_f1_lost == 0``). For a
    guaranteed-exact threshold fold the batches into ``F1AdaptiveThreshold.empty()``
    (exact mode) outside jit instead.

    Example::

      metrics = nnx.MultiMetric(
          pixel_f1=jaxnorm.nnx.F1AdaptiveThresholdMetric("anomaly_maps", "masks"),
          scores=jaxnorm.nnx.MinMaxMetric(argname="anomaly_maps"),
      )

      @nnx.jit
      def eval_step(model, metrics, images, masks):
          metrics.update(anomaly_maps=model.anomaly_maps(images), masks=masks)

      for images, masks in val_loader:
          eval_step(model, metrics, images, masks)
      pixel_threshold = metrics.compute()["pixel_f1"]

    Args:
      argname: the keyword argument of ``update`` that holds the scores.
      label_argname: the keyword argument that holds one label per score (bool or 0/1).
      mask_argname: an optional keyword argument holding a mask broadcastable to the
        scores (True, or non-zero, marks values to count); ``None`` never reads one.
      slots: bins with exact counts (512 KiB each; see ``F1AdaptiveThreshold.empty``).
      nonfinite: ``"raise"`` (``compute`` raises when NaN/inf scores were seen) or
        ``"omit"``.
    """

    def __init__(
        self,
        argname: str = "anomaly_maps",
        label_argname: str = "masks",
        mask_argname: str | None = "mask",
        *,
        slots: int = DEFAULT_SLOTS,
        nonfinite: str = "raise",
    ):
        self.argname = argname
        self.label_argname = label_argname
        self.mask_argname = mask_argname
        self.slots = slots
        self.nonfinite = nonfinite
        empty = self._empty()
        for name in _FIELDS:
            setattr(self, name, nnx.metrics.MetricState(getattr(empty, name)))

    def _empty(self) -> F1AdaptiveThreshold:
        return F1AdaptiveThreshold.empty("bounded", slots=self.slots, nonfinite=self.nonfinite)

    def reset(self) -> None:
        """Forgets every value seen."""
        self._set(self._empty())

    def update(self, **kwargs) -> None:
        """Folds ``kwargs[argname]`` with ``kwargs[label_argname]`` into the state.

        Raises:
          TypeError: the scores or the labels are missing (as ``nnx.metrics.Average`` does).
          ValueError: as ``F1AdaptiveThreshold.update``.
        """
        for name in (self.argname, self.label_argname):
            if name not in kwargs:
                raise TypeError(
                    f"F1AdaptiveThresholdMetric.update: expected keyword argument {name!r}, got "
                    f"{sorted(kwargs)}; pass the scores as {self.argname}=... and the labels "
                    f"as {self.label_argname}=..., or build the metric with argname=/"
                    "label_argname= to read other keys."
                )
        mask = read_mask(kwargs, self.mask_argname)
        scores = kwargs[self.argname]
        # Placed with the scores, as MinMaxMetric places its state (no second compile).
        state = placement.place(self.state(), placement.target((scores,)))
        self._set(state.update(scores, kwargs[self.label_argname], mask))

    def state(self) -> F1AdaptiveThreshold:
        """The state as a ``jaxnorm.F1AdaptiveThreshold`` (to merge, reduce or inspect)."""
        fields = {name: getattr(self, name)[...] for name in _FIELDS}
        return F1AdaptiveThreshold(**fields, chunks=(), mode="bounded", nonfinite=self.nonfinite)

    def compute(self):
        """The threshold: a float32 0-d array (reads the counts back to the host)."""
        return self.state().compute()

    def compute_with_bound(self):
        """``(threshold, f1, max_f1_lost)``, see ``F1AdaptiveThreshold.compute_with_bound``."""
        return self.state().compute_with_bound()

    def merge(self, other: F1AdaptiveThresholdMetric | F1AdaptiveThreshold) -> None:
        """Folds another metric's (or a bounded state's) counts into this one, in place."""
        if isinstance(other, F1AdaptiveThresholdMetric):
            other = other.state()
        self._set(self.state().merge(other))

    def _set(self, state: F1AdaptiveThreshold) -> None:
        for name in _FIELDS:
            set_variable(getattr(self, name), getattr(state, name))
