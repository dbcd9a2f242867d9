"""What a case produces: rows of measurements, targets, and notes, ready to report."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks import environment
from benchmarks.timing import CompileTime, Timing

_OPS = {"<=": operator.le, ">=": operator.ge}


@dataclasses.dataclass
class Row:
    """One contender in one configuration of a case.

    Attributes:
      group: the configuration, e.g. ``"(32, 1, 256, 256) float32"``; ratios compare rows of
        the same group.
      name: the contender.
      role: ``"jaxnorm"``, ``"baseline"`` or ``"roofline"``.
      timing: steady-state time per call, if timed.
      compile: compile cost of a fresh jit, for jitted contenders.
      bytes_moved: bytes read plus written per call, for effective bandwidth.
      extra: other measurements (compile counts, memory), shown as their own columns.
    """

    group: str
    name: str
    role: str = "baseline"
    timing: Timing | None = None
    compile: CompileTime | None = None
    bytes_moved: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def gbps(self) -> float | None:
        """Effective bandwidth from the median time."""
        if self.timing is None or not self.bytes_moved:
            return None
        return self.bytes_moved / self.timing.median / 1e9


@dataclasses.dataclass(frozen=True)
class Target:
    """A performance goal, checked against this run.

    Attributes:
      label: what is compared, in words.
      value: the measured ratio (or quantity) from the best blocks: the quietest moments of
        a shared machine, least distorted by other processes' load. ``met`` judges it.
      op: ``"<="`` or ``">="``.
      bound: the goal.
      median: the same ratio from the median blocks, when it applies.
      unit: printed after the numbers, e.g. ``"x"``.
      note: what limits the measurement when the goal is missed, when known.
      pending: why the goal was not judged in this run (e.g. it is a GPU goal and this run
        is on a CPU); ``value`` is then NaN and the tables say so instead of met / not met.
    """

    label: str
    value: float
    op: str
    bound: float
    median: float | None = None
    unit: str = "x"
    note: str = ""
    pending: str = ""

    @property
    def met(self) -> bool:
        return not self.pending and bool(_OPS[self.op](self.value, self.bound))

    @property
    def met_median(self) -> bool | None:
        return None if self.median is None else bool(_OPS[self.op](self.median, self.bound))


@dataclasses.dataclass
class CaseResult:
    """Everything one case measured.

    Attributes:
      key: the name given to ``--cases``.
      title: a heading.
      rows: measurements.
      targets: goals checked in this run.
      notes: facts worth printing under the table (methodology, checks, causes).
      skipped: why the case did not run, if it did not.
      error: the traceback, if the case failed.
      columns: names of ``Row.extra`` entries to show, in order.
    """

    key: str
    title: str
    rows: list[Row] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    columns: list[str] = dataclasses.field(default_factory=list)

    def row(self, group: str, name: str) -> Row:
        """The row of ``name`` in ``group``."""
        for r in self.rows:
            if r.group == group and r.name == name:
                return r
        raise KeyError(f"no row {name!r} in group {group!r} of case {self.key!r}")

    def ratio(self, group: str, name: str, ref: str, stat: str = "best") -> float:
        """Time of ``name`` over time of ``ref`` in ``group``, both from this run."""
        a, b = self.row(group, name).timing, self.row(group, ref).timing
        if a is None or b is None:
            raise ValueError(f"{name!r} or {ref!r} in {group!r} was not timed")
        return getattr(a, stat) / getattr(b, stat)

    def add_ratio_target(
        self,
        label: str,
        group: str,
        num: str,
        den: str,
        op: str,
        bound: float,
        note: str = "",
        platform: str | None = None,
    ) -> Target:
        """Adds the goal ``time(num) / time(den) op bound`` in ``group``, from best and median.

        A goal set for one ``platform`` (``"cpu"``, ``"gpu"``) is judged only on a run whose
        jax device is of it; other runs list it as pending, so that every goal shows.
        """
        if not _judged_here(platform):
            return self.add_target(label, float("nan"), op, bound, platform=platform)
        return self.add_target(
            label,
            self.ratio(group, num, den, "best"),
            op,
            bound,
            median=self.ratio(group, num, den, "median"),
            note=note,
        )

    def add_target(
        self,
        label: str,
        value: float,
        op: str,
        bound: float,
        *,
        median: float | None = None,
        unit: str = "x",
        note: str = "",
        platform: str | None = None,
    ) -> Target:
        """Adds the goal ``value op bound`` for a quantity the case computed itself.

        As in ``add_ratio_target``, a goal of another ``platform`` is listed as pending, and
        ``value`` and ``median`` are then left out.
        """
        if not _judged_here(platform):
            here = environment.jax_device().platform
            target = Target(
                label,
                float("nan"),
                op,
                bound,
                unit=unit,
                pending=f"{platform.upper()} runs only (this run: {here.upper()})",
            )
        else:
            target = Target(label, value, op, bound, median=median, unit=unit, note=note)
        self.targets.append(target)
        return target


def _judged_here(platform: str | None) -> bool:
    return platform is None or platform == environment.jax_device().platform


def case_from_json(d: Mapping[str, Any]) -> CaseResult:
    """A ``CaseResult`` back from its stored JSON (``report.write``), to report it again.

    Results written before a field existed still load: it takes its default.
    """

    def timing_of(t: Mapping[str, Any] | None) -> Timing | None:
        if t is None:
            return None
        return Timing(
            number=t["number"],
            samples=tuple(t["samples"]),
            faults_per_call=t.get("faults_per_call"),
        )

    def compile_of(c: Mapping[str, Any] | None) -> CompileTime | None:
        if c is None:
            return None
        return CompileTime(**{f.name: c[f.name] for f in dataclasses.fields(CompileTime)})

    def fields_of(cls: type, x: Mapping[str, Any]) -> dict[str, Any]:
        return {f.name: x[f.name] for f in dataclasses.fields(cls) if f.name in x}

    rows = [
        Row(
            **{
                **fields_of(Row, r),
                "timing": timing_of(r.get("timing")),
                "compile": compile_of(r.get("compile")),
            }
        )
        for r in d.get("rows", [])
    ]
    targets = [Target(**fields_of(Target, t)) for t in d.get("targets", [])]
    return CaseResult(
        **{**fields_of(CaseResult, d), "rows": rows, "targets": targets},
    )


def timed_rows(
    group: str,
    contenders: Sequence[Any],
    timings: Mapping[str, Timing],
    *,
    compile: Mapping[str, CompileTime] | None = None,
    bytes_moved: int | None = None,
    extra: Mapping[str, dict[str, Any]] | None = None,
) -> list[Row]:
    """One row per contender of a timed comparison (contenders have ``name`` and ``role``)."""
    compile, extra = compile or {}, extra or {}
    return [
        Row(
            group=group,
            name=c.name,
            role=c.role,
            timing=timings[c.name],
            compile=compile.get(c.name),
            bytes_moved=bytes_moved,
            extra=extra.get(c.name, {}),
        )
        for c in contenders
    ]
