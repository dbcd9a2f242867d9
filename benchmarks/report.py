"""Turns case results into a console table, JSON, markdown and the README's benchmark block."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

from benchmarks.records import CaseResult, Row

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def fmt_time(seconds: float | None) -> str:
    """A duration with a unit that keeps three significant digits."""
    if seconds is None:
        return ""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _reference(rows: Sequence[Row], group: str) -> Row | None:
    """The first timed jaxnorm row of ``group``: what the other rows are compared with."""
    for r in rows:
        if r.group == group and r.role == "jaxnorm" and r.timing is not None:
            return r
    return None


def case_table(case: CaseResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a case's table, as strings."""
    has_compile = any(r.compile for r in case.rows)
    has_gbps = "GB/s" in case.columns
    has_faults = "faults/call" in case.columns
    extra = [c for c in case.columns if c not in ("GB/s", "faults/call")]
    header = [
        "config",
        "contender",
        "best",
        "median",
        "spread",
        "x jaxnorm (best)",
        "x jaxnorm (median)",
    ]
    header += ["GB/s"] if has_gbps else []
    header += ["faults/call"] if has_faults else []
    header += ["compile", "1st call"] if has_compile else []
    header += extra
    body = []
    for r in case.rows:
        ref = _reference(case.rows, r.group)
        t = r.timing
        ratios = (
            ["", ""]
            if t is None or ref is None
            else [f"{t.best / ref.timing.best:.2f}x", f"{t.median / ref.timing.median:.2f}x"]
        )
        line = [
            r.group,
            r.name,
            fmt_time(t.best if t else None),
            fmt_time(t.median if t else None),
            f"{100 * t.spread:.0f}%" if t else "",
            *ratios,
        ]
        if has_gbps:
            line.append(_fmt(r.gbps))
        if has_faults:
            line.append(f"{t.faults_per_call:.0f}" if t and t.faults_per_call is not None else "")
        if has_compile:
            line += [
                fmt_time(r.compile.compile_s) if r.compile else "",
                fmt_time(r.compile.first_call_s) if r.compile else "",
            ]
        line += [_fmt(r.extra.get(c)) for c in extra]
        body.append(line)
    return header, body


def targets_table(cases: Sequence[CaseResult]) -> tuple[list[str], list[list[str]]]:
    """Every target of the run: judged on the best blocks, with the median ratio beside."""
    body = [_target_row(_jsonable(t)) for case in cases for t in case.targets]
    return TARGET_HEADER, body


TARGET_HEADER = ["target", "goal", "best", "median", "met"]


def _target_row(t: dict[str, Any]) -> list[str]:
    """One row of a targets table, from a target as stored in the JSON."""
    goal = f"{t['op']} {t['bound']:g}{t['unit']}"
    if t.get("pending"):
        return [t["label"], goal, "", "", f"not judged: {t['pending']}"]
    median = "" if t["median"] is None else f"{t['median']:.2f}{t['unit']}"
    met = "yes" if t["met"] else "**no**"
    if t["met_median"] is not None and t["met_median"] != t["met"]:
        met += " (median: " + ("yes" if t["met_median"] else "no") + ")"
    return [
        t["label"],
        goal,
        f"{t['value']:.2f}{t['unit']}",
        median,
        met,
    ]


def _text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def _md_table(header: list[str], body: list[list[str]]) -> str:
    def esc(x: str) -> str:
        return x.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(x) for x in row) + " |" for row in body]
    return "\n".join(lines)


def console(case: CaseResult) -> str:
    """One case, for the terminal."""
    out = [f"\n== {case.key}: {case.title}"]
    if case.skipped:
        out.append(f"SKIPPED: {case.skipped}")
    if case.error:
        out.append(f"ERROR:\n{case.error}")
    if case.rows:
        out.append(_text_table(*case_table(case)))
    for t in case.targets:
        if t.pending:
            out.append(f"target: {t.label}: {t.op} {t.bound:g}{t.unit} -> not judged: {t.pending}")
            continue
        median = "" if t.median is None else f" (median {t.median:.2f}{t.unit})"
        out.append(
            f"target: {t.label}: {t.value:.2f}{t.unit}{median} {t.op} {t.bound:g}{t.unit}"
            f" -> {'met' if t.met else 'MISSED'}"
            f"{': ' + t.note if t.note and not t.met else ''}"
        )
    out += [f"note: {n}" for n in case.notes]
    return "\n".join(out)


def summary(cases: Sequence[CaseResult]) -> str:
    """The targets of the whole run, for the terminal."""
    header, body = targets_table(cases)
    if not body:
        return ""
    return "\n== targets\n" + _text_table(header, [[x.replace("**", "") for x in r] for r in body])


def markdown(
    cases: Sequence[CaseResult],
    env: dict[str, Any],
    command: str,
    heading: str | None = "## Benchmarks",
) -> str:
    """The run as markdown: a heading, provenance, the targets, then one table per case."""
    lines = [heading, ""] if heading else []
    lines += [
        f"Generated by `{command}` on **{env['machine']}** ({env['cpu']}, {env['cpu_cores']} "
        f"cores; jax device: {env['jax_backend']} {env['jax_device']}; torch device: "
        f"{env['torch_device']}) at {env['date']}"
        + (f", commit {env['commit']}." if env.get("commit") else "."),
        f"jax {env['jax']}, jaxlib {env['jaxlib']}, torch {env['torch']}, numpy {env['numpy']}, "
        f"Python {env['python']}.",
        "",
        "Each contender is timed in blocks of consecutive, synchronised calls, the blocks of "
        "all contenders of a case alternating over several rounds; *best* and *median* are "
        "per call over the blocks, *spread* is their interquartile range over the median, "
        "and every ratio comes from this one run. Targets are judged on the best blocks (the "
        "quietest moments of a shared machine; load from other processes slows torch's "
        "OpenMP pool most), with the median ratio beside them. *compile* is XLA compilation "
        "of a fresh `jax.jit`, *1st call* its trace + compile + first run. The pipelined "
        "cases (`pipeline`, `overhead`, `fused`, `load`) time whole loops of batches with "
        "one sync at the end, as a real loop runs, and show the time per batch.",
    ]
    header, body = targets_table(cases)
    if body:
        lines += ["", "**Targets**", "", _md_table(header, body)]
        notes = [f"- {t.label}: {t.note}" for c in cases for t in c.targets if t.note and not t.met]
        lines += [""] + notes if notes else []
    for case in cases:
        lines += ["", f"**{case.key}**: {case.title}", ""]
        if case.skipped:
            lines.append(f"Skipped: {case.skipped}")
        if case.error:
            last = case.error.strip().splitlines()[-1]
            lines.append(f"Failed: `{last}`")
        if case.rows:
            lines.append(_md_table(*case_table(case)))
        if case.notes:
            lines += [""] + [f"- {n}" for n in case.notes]
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        d = {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        for prop in ("best", "median", "spread", "met", "met_median", "gbps"):
            if hasattr(type(obj), prop):
                d[prop] = _jsonable(getattr(obj, prop))
        return d
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write(
    out_dir: pathlib.Path,
    stem: str,
    cases: Sequence[CaseResult],
    env: dict[str, Any],
    md: str,
    argv: list[str],
) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes ``<stem>.json`` and ``<stem>.md`` under ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    payload = {"env": env, "argv": argv, "cases": _jsonable(list(cases))}
    jpath.write_text(json.dumps(payload, indent=1) + "\n")
    mpath.write_text(md)
    return jpath, mpath


def inject_readme(readme: pathlib.Path, md: str) -> None:
    """Replaces the README's benchmark block with ``md``, appending the block if absent."""
    text = readme.read_text()
    block = f"{README_START}\n{md.rstrip()}\n{README_END}"
    start, end = text.find(README_START), text.find(README_END)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(README_END) :]
    else:
        sep = "" if text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        text = f"{text}{sep}{block}\n"
    readme.write_text(text)
