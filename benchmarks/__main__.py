"""``python -m benchmarks``: runs every case side by side and publishes the results.

Writes ``<out>/<machine>.json`` and ``<out>/<machine>.md``, where ``<machine>`` names this
machine's hardware (``cpu-<model>-<cores>c``, ``gpu-<device>``) or ``$JAXNORM_BENCH_MACHINE``.
A full run of every case then publishes what the JSON files in ``<out>`` hold
(``benchmarks.publish``): the full tables of every stored run in
``docs/_generated/benchmarks.md``, the headline table in ``docs/_generated/headline.md`` and
between the README's ``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers, and the plot
of the headline figures in ``docs/_generated/benchmark-ratios.png``. ``--replot`` publishes
the stored results again without measuring. ``--quick`` runs fewer shapes and rounds for
smoke tests, and ``--cases`` a subset: such runs are written as ``<machine>-quick.*`` or
``<machine>-<cases>.*`` and publish nothing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
import traceback

from benchmarks import environment, report
from benchmarks.cases import CASES, load
from benchmarks.cases.base import RunConfig
from benchmarks.records import CaseResult

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer shapes, rounds and batches (well under a minute); results are "
        "written as <machine>-quick.* and the README is left alone",
    )
    p.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated cases to run, from: {', '.join(CASES)} (default: all)",
    )
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=ROOT / "benchmarks" / "results",
        help="directory for <machine>.json and <machine>.md (default: benchmarks/results)",
    )
    p.add_argument(
        "--no-readme", action="store_true", help="do not rewrite README.md's benchmark block"
    )
    p.add_argument(
        "--readme",
        type=pathlib.Path,
        default=ROOT / "README.md",
        help="the README whose benchmark block is rewritten (default: README.md)",
    )
    p.add_argument(
        "--docs",
        type=pathlib.Path,
        default=ROOT / "docs" / "_generated",
        help="directory for the generated benchmarks.md and benchmark-ratios.png "
        "(default: docs/_generated)",
    )
    p.add_argument("--no-docs", action="store_true", help="do not write the generated docs files")
    p.add_argument(
        "--replot",
        action="store_true",
        help="measure nothing: rebuild the docs files and the README block from the JSON "
        "results in --out",
    )
    args = p.parse_args(argv)
    args.case_keys = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.case_keys if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    return args


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return float("nan")


def _run_case(key: str, config: RunConfig) -> CaseResult:
    before = _load()
    try:
        result = load(key).run(config)
    except Exception:  # one broken case must not hide the others' results
        result = CaseResult(key=key, title=key, error=traceback.format_exc())
    # Other processes' load distorts timings, torch's OpenMP pool most: say how busy it was.
    result.notes.append(
        f"1-minute load average {before:.1f} before this case, {_load():.1f} "
        f"after, on {environment.cpu_count()} cores."
    )
    return result


def main(argv: list[str] | None = None) -> int:
    """Runs the selected cases; returns 1 if any case failed, else 0."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.replot:
        _publish(args)
        return 0
    config = RunConfig.make(quick=args.quick)
    env = environment.describe()
    print(
        f"machine {env['machine']}: jax {env['jax']} on {env['jax_backend']} "
        f"({env['jax_device']}), torch {env['torch']} on {env['torch_device']}, "
        f"{'quick' if args.quick else 'full'} run",
        flush=True,
    )

    results = []
    for key in args.case_keys:
        t0 = time.perf_counter()
        result = _run_case(key, config)
        results.append(result)
        print(report.console(result), flush=True)
        print(f"({key}: {time.perf_counter() - t0:.1f} s)", flush=True)
    print(report.summary(results))

    command = "python -m benchmarks" + (" " + " ".join(argv) if argv else "")
    md = report.markdown(results, env, command)
    # Only a full run of every case is published under the machine's own name and in the
    # README; quick or partial runs get their own file names and leave the README alone.
    complete = args.case_keys == list(CASES)
    stem = env["machine"] + ("-quick" if args.quick else "")
    stem += "" if complete else "-" + "-".join(args.case_keys)
    jpath, mpath = report.write(args.out, stem, results, env, md, argv)
    print(f"wrote {jpath} and {mpath}")
    if not args.quick and complete:
        _publish(args)
    return 1 if any(r.error for r in results) else 0


def _publish(args: argparse.Namespace) -> None:
    """The docs' tables and plot and the README's headline, from the JSON files in --out."""
    from benchmarks import publish

    if args.no_docs and args.no_readme:
        return
    for line in publish.publish(
        args.out,
        args.docs,
        None if args.no_readme else args.readme,
        write_docs=not args.no_docs,
    ):
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
