"""The published figures: anomalib 0.7's time over jaxnorm's, found in a stored run by name.

Each ``Headline`` names its case, its row group and its two rows with ``benchmarks.labels``,
the names the cases give their rows. A run that measured the case but has no such rows
(a renamed contender or group) raises ``MissingRow``: a figure is never dropped in silence.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Protocol

from benchmarks import labels as L
from benchmarks.records import CaseResult
from benchmarks.report import fmt_time


class MissingRow(LookupError):
    """A run measured a headline's case, but not under the headline's group or row names."""


class Run(Protocol):
    """What a headline reads of a stored run (``publish.Run``)."""

    name: str
    path: object

    def case(self, key: str) -> CaseResult | None: ...


@dataclasses.dataclass(frozen=True)
class Headline:
    """One figure of the plot (and maybe of the headline table).

    Attributes:
      label: what it is, in a few words.
      case: the case key.
      baseline: the anomalib row.
      contender: the jaxnorm row.
      starts, ends: the row group starts and ends with these (the middle may hold a batch
        count, which quick runs change).
      readme: shown in the headline table too.
      loop_phase: for the ``loop`` case, ``"validate"`` or ``"test"``: the ratio of what each
        callback costs the whole loop per batch, from the case's two batch counts.
    """

    label: str
    case: str
    baseline: str
    contender: str
    starts: str = ""
    ends: str = ""
    readme: bool = False
    loop_phase: str | None = None

    def group(self, case: CaseResult) -> str | None:
        """The first row group of ``case`` that this headline reads, if any."""
        return next(
            (
                r.group
                for r in case.rows
                if r.group.startswith(self.starts) and r.group.endswith(self.ends)
            ),
            None,
        )


_MAPS = L.batch_group(L.MAPS_256)
_F32 = L.array_group(L.MAPS_256, "float32")
HEADLINES = [
    Headline("normalize, (32, 1, 256, 256) f32", "normalize", L.ANOMALIB_NORMALIZE, L.NORMALIZE,
             starts=_F32, ends=_F32, readme=True),
    Headline("MinMax.update, (32, 1, 256, 256) f32", "minmax", L.ANOMALIB_UPDATE, L.UPDATE,
             starts=_F32, ends=_F32, readme=True),
    Headline("shim, one test batch, synced", "shim", L.ANOMALIB_NORMALIZE_BATCH,
             L.SHIM_TEST_BATCH, starts=L.SHIM_MAPS_GROUP, ends=L.SHIM_MAPS_GROUP),
    Headline("Flax hook, ragged boxes, test", "ragged", L.ANOMALIB_CALLBACK_EAGER, L.HOOK_CLASS,
             starts="test, "),
    Headline("normalize, pipelined", "pipeline", L.ANOMALIB_NORMALIZE, L.NORMALIZE,
             starts="normalize, "),
    Headline("MinMax.update, pipelined", "pipeline", L.ANOMALIB_UPDATE, L.UPDATE_CHAINED,
             starts="MinMax.update, "),
    Headline("Flax hook, test, pipelined", "pipeline", L.ANOMALIB_CALLBACK, L.HOOK,
             starts="test, ", ends=_MAPS, readme=True),
    Headline("Flax hook, validation, pipelined", "pipeline", L.ANOMALIB_CALLBACK, L.HOOK,
             starts="validation, ", ends=_MAPS),
    Headline("shim, test, pipelined", "pipeline", L.ANOMALIB_CALLBACK, L.SHIM,
             starts="test, ", ends=_MAPS, readme=True),
    Headline("shim, validation, pipelined", "pipeline", L.ANOMALIB_CALLBACK, L.SHIM,
             starts="validation, ", ends=_MAPS, readme=True),
    Headline("shim, tiny test batches, fresh tensors", "pipeline", L.ANOMALIB_CALLBACK, L.SHIM,
             starts=L.FRESH + "test, "),
    Headline("Lightning loop, validate, whole loop per batch", "loop", L.ANOMALIB_CALLBACK,
             L.SHIM, loop_phase="validate"),
    Headline("Lightning loop, test, whole loop per batch", "loop", L.ANOMALIB_CALLBACK, L.SHIM,
             loop_phase="test"),
    Headline("anomalib 2 PostProcessor, test", "postprocessor", L.ANOMALIB2_POSTPROCESSOR,
             L.POSTPROCESSOR, starts="test, "),
    Headline("anomalib 2 PostProcessor, validation (F1 + min/max)", "postprocessor",
             L.ANOMALIB2_POSTPROCESSOR, L.POSTPROCESSOR, starts="validation, F1 "),
]  # fmt: skip


def _missing(h: Headline, run: Run, what: str) -> MissingRow:
    return MissingRow(
        f"headline {h.label!r}: case {h.case!r} of {run.name} ({run.path}) has {what}. A "
        "contender or group was renamed in benchmarks/labels.py after this run: run the case "
        f"again (`python -m benchmarks --cases {h.case}`), or delete the stored run."
    )


def loop_per_batch(case: CaseResult, phase: str) -> dict[str, float] | None:
    """The ``loop`` case's time per batch of each callback, from its two batch counts (best).

    None when the case did not time two batch counts of ``phase``.
    """
    runs: dict[int, dict[str, float]] = {}
    for r in case.rows:
        hit = re.match(rf"{phase}, (\d+) batches of .*, whole run$", r.group)
        if hit and r.timing is not None:
            runs.setdefault(int(hit.group(1)), {})[r.name] = r.timing.best
    if len(runs) != 2:
        return None
    (n1, t1), (n2, t2) = sorted(runs.items())
    return {name: (t2[name] - t1[name]) / (n2 - n1) for name in t1 if name in t2}


def _loop_rows(h: Headline, run: Run, names: Sequence[str]) -> dict[str, float] | None:
    case = run.case(h.case)
    if case is None:
        return None
    per_batch = loop_per_batch(case, h.loop_phase)
    if per_batch is None or not set(names) <= set(per_batch):
        raise _missing(h, run, f"no {h.loop_phase!r} rows of {list(names)} at two batch counts")
    return per_batch


def ratio(h: Headline, run: Run) -> float | None:
    """``time(baseline) / time(contender)`` (> 1: jaxnorm is faster), None if not measured.

    Raises:
      MissingRow: ``run`` measured the case, but not under these names.
    """
    if h.loop_phase:
        per_batch = _loop_rows(h, run, (h.baseline, h.contender))
        if per_batch is None or per_batch[h.contender] <= 0:
            return None
        return per_batch[h.baseline] / per_batch[h.contender]
    case = run.case(h.case)
    if case is None:
        return None
    group = h.group(case)
    if group is None:
        raise _missing(h, run, f"no group starting {h.starts!r} and ending {h.ends!r}")
    names = {r.name for r in case.rows if r.group == group}
    if not {h.baseline, h.contender} <= names:
        raise _missing(
            h, run, f"no row {h.baseline!r} or {h.contender!r} in {group!r} (it has {names})"
        )
    return case.ratio(group, h.baseline, h.contender)


def loop_extras(run: Run, phase: str) -> str | None:
    """What each callback adds per batch to the loop without one, as headline text."""
    names = (L.NO_CALLBACK, L.SHIM, L.ANOMALIB_CALLBACK)
    per_batch = _loop_rows(Headline(f"loop, {phase}", "loop", "", "", loop_phase=phase), run, names)
    if per_batch is None:
        return None

    def plus(name: str) -> str:
        d = per_batch[name] - per_batch[L.NO_CALLBACK]
        return ("+" if d >= 0 else "-") + fmt_time(abs(d))

    return f"shim {plus(L.SHIM)}, anomalib {plus(L.ANOMALIB_CALLBACK)}"
