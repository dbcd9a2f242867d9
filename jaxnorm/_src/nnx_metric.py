"""``MinMaxMetric``: ``jaxnorm.MinMax`` as a ``flax.nnx.Metric``, for ``nnx.MultiMetric``."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxnorm._src import placement
from jaxnorm._src.compat import set_variable
from jaxnorm._src.minmax import MinMax


def read_mask(kwargs: dict, mask_argname: str | None):
    """The bool mask in ``kwargs[mask_argname]``, if any (``None`` reads none)."""
    mask = kwargs.get(mask_argname) if mask_argname is not None else None
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            # nnx's metrics multiply by the mask, so they accept 0/1 masks of any dtype.
            mask = mask != 0
    return mask


class MinMaxMetric(nnx.Metric):
    """The running min and max of anomaly scores, as an ``nnx.Metric``.

    A thin view of ``jaxnorm.MinMax``: the state lives in ``nnx.metrics.MetricState``
    variables named ``min`` and ``max`` (anomalib's checkpoint keys), and every update is
    ``MinMax.update``, so non-finite values are skipped exactly as there. It works eagerly,
    inside ``nnx.jit``, and inside ``nnx.MultiMetric`` beside the built-in metrics:
    ``update`` reads only its own keyword arguments and ignores the rest.

    Example::

      metrics = nnx.MultiMetric(
          loss=nnx.metrics.Average(argname="loss"),
          scores=jaxnorm.nnx.MinMaxMetric(argname="anomaly_maps"),
      )

      @nnx.jit
      def eval_step(model, metrics, images):
          maps = model.anomaly_maps(images)
          metrics.update(loss=jnp.mean(maps), anomaly_maps=maps)

      for images in val_loader:
          eval_step(model, metrics, images)
      stats = metrics.compute()["scores"]        # a jaxnorm.MinMax
      hook.set_stats(stats)                      # normalize test outputs with them

    Args:
      argname: the keyword argument of ``update`` that holds the scores.
      mask_argname: the keyword argument that holds an optional mask broadcastable to the
        scores (True, or non-zero, marks values to fold in). The default ``"mask"`` is the
        name ``nnx.MultiMetric`` forwards; pass it there as ``{"<metric name>": mask}`` when
        other metrics need a different mask. ``None`` never reads a mask.

    Attributes:
      min: ``MetricState`` with the smallest finite score seen (``+inf`` when empty).
      max: ``MetricState`` with the largest finite score seen (``-inf`` when empty).
      num_nonfinite: ``MetricState`` counting the NaN/inf scores that were skipped (uint32).
    """

    def __init__(self, argname: str = "anomaly_maps", mask_argname: str | None = "mask"):
        self.argname = argname
        self.mask_argname = mask_argname
        empty = MinMax.empty()
        self.min = nnx.metrics.MetricState(empty.min)
        self.max = nnx.metrics.MetricState(empty.max)
        self.num_nonfinite = nnx.metrics.MetricState(jnp.zeros((), jnp.uint32))

    def reset(self) -> None:
        """Forgets every value seen: back to ``MinMax.empty()``."""
        empty = MinMax.empty()
        set_variable(self.min, empty.min)
        set_variable(self.max, empty.max)
        set_variable(self.num_nonfinite, jnp.zeros((), jnp.uint32))

    def update(self, **kwargs) -> None:
        """Folds ``kwargs[argname]`` (where ``kwargs[mask_argname]`` is true) into the state.

        Args:
          **kwargs: must hold ``argname``; may hold ``mask_argname``. Anything else is ignored,
            so one ``nnx.MultiMetric.update`` call can feed several metrics.

        Raises:
          TypeError: ``argname`` is missing (as ``nnx.metrics.Average`` does).
          ValueError: the scores are not a real-valued array, or the mask does not broadcast.
        """
        if self.argname not in kwargs:
            raise TypeError(
                f"MinMaxMetric.update: expected keyword argument {self.argname!r}, got "
                f"{sorted(kwargs)}; pass the scores as {self.argname}=..., or build the "
                "metric with MinMaxMetric(argname=...) to read another key."
            )
        mask = read_mask(kwargs, self.mask_argname)
        values = kwargs[self.argname]
        # Placed with the values, as MinMax.update places its state: a fresh count added to
        # a committed one would compile the addition again at the next update.
        state, count = placement.place(
            (self.compute(), self.num_nonfinite[...]), placement.target((values,))
        )
        state, n_bad = state.update_and_count(values, mask)
        set_variable(self.min, state.min)
        set_variable(self.max, state.max)
        set_variable(self.num_nonfinite, count + n_bad)

    def compute(self) -> MinMax:
        """Returns the statistics as a ``jaxnorm.MinMax`` (``.min``, ``.max``).

        A pytree of two float32 scalars: pass it to ``jaxnorm.normalize(x, t, s.min, s.max)``,
        to ``MinMaxNormalizationHook.set_stats``, or merge it with other states.
        """
        return MinMax(min=self.min[...], max=self.max[...])

    def merge(self, other: MinMaxMetric | MinMax) -> None:
        """Folds another metric's (or a ``MinMax``'s) statistics into this one, in place."""
        if isinstance(other, MinMaxMetric):
            set_variable(self.num_nonfinite, self.num_nonfinite[...] + other.num_nonfinite[...])
            other = other.compute()
        if not isinstance(other, MinMax):
            raise TypeError(
                f"MinMaxMetric.merge: expected a MinMaxMetric or a jaxnorm.MinMax, got "
                f"{type(other).__name__}."
            )
        state = self.compute().merge(other)
        set_variable(self.min, state.min)
        set_variable(self.max, state.max)
