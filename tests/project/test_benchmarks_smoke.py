"""The benchmark command runs end to end (``--quick``) and publishes stored results
(``--replot``); no timing is asserted."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import __main__ as bench_main
from benchmarks import environment, headlines, publish, report
from benchmarks import labels as L
from benchmarks.cases import CASES
from benchmarks.records import CaseResult, Row, Target, case_from_json
from benchmarks.timing import Timing

ROOT = Path(__file__).resolve().parents[2]

# The goals set for one platform, by the start of their labels: each must be in every run's
# targets table, judged on its platform's run and listed as not judged on the others.
PLATFORM_TARGETS = [
    "CPU: hook per batch at tiny sizes, test",
    "CPU: hook per batch at tiny sizes, validation",
    "CPU: pipelined shim, test",
    "CPU: pipelined jaxnorm hook, validation",
    "CPU: pipelined torch_compat callback, validation",
    "GPU: pipelined shim, test",
    "GPU: pipelined normalize",
    "GPU: pipelined MinMax.update",
    "GPU: fused eval step, validation",
    "GPU: fused eval step, test",
    "GPU: loop, validate: shim time per batch / anomalib's",
    "GPU: loop, validate: the shim's extra cost per run",
    "GPU: loop, test: shim time per batch / anomalib's",
    "GPU: loop, test: the shim's extra cost per run",
    "CPU: loop at tiny sizes",
    "CPU: shim time per test batch at tiny sizes, fresh tensors every batch",
    "CPU: normalize (32,) float32 with jax-array statistics",
    "CPU: normalize (32, 1, 256, 256) float32 with jax-array statistics",
]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as users run it
    env["PYTHONPATH"] = str(ROOT)
    env[environment.MACHINE_ENV] = "Quick Test Machine"  # results land under this name
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-readme", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = out.glob("*.json")
    assert result.name == "quick-test-machine-quick.json"
    return result, json.loads(result.read_text())


@pytest.mark.slow
def test_quick_benchmark_runs_every_case(quick_run):
    result, data = quick_run
    cases = data["cases"]
    assert [c["key"] for c in cases] == list(CASES)
    assert {"pipeline", "overhead", "fused", "load", "loop"} <= set(CASES)
    for case in cases:
        if case["key"] == "postprocessor" and importlib.util.find_spec("anomalib") is None:
            # anomalib 2 lives in its own environment (make bench-anomalib2): said, not hidden
            assert "make bench-anomalib2" in case["skipped"] and not case["rows"]
            continue
        assert not case["error"] and not case["skipped"], case["key"]
        assert case["rows"], case["key"]
    # the outputs were checked equal to the baselines before timing
    notes = " ".join(n for c in cases for n in c["notes"])
    assert "DISAGREE" not in notes and "agree" in notes
    assert result.with_suffix(".md").read_text().startswith("## Benchmarks")


@pytest.mark.slow
def test_quick_benchmark_pipelined_cases_compare_every_contender(quick_run):
    cases = {c["key"]: c for c in quick_run[1]["cases"]}
    groups = {}
    for key in ("pipeline", "overhead", "fused"):
        for row in cases[key]["rows"]:
            groups.setdefault((key, row["group"]), set()).add(row["name"])
            assert row["timing"]["best"] > 0, (key, row)
    callbacks = {"jaxnorm hook", "torch_compat callback", "anomalib 0.7 callback"}
    for phase in ("test", "validation"):
        for maps in ("(32, 1, 256, 256)", "(32, 1, 8, 8)"):
            (names,) = [
                v
                for (k, g), v in groups.items()
                if k == "pipeline" and g.startswith(phase) and maps in g
            ]
            assert names == callbacks, (phase, maps)
        (names,) = [v for (k, g), v in groups.items() if k == "overhead" and g.startswith(phase)]
        assert {"jaxnorm hook", "torch_compat callback"} < names
        assert any(n.startswith("floor:") for n in names)
        (names,) = [v for (k, g), v in groups.items() if k == "fused" and g.startswith(phase)]
        assert "eval step alone" in names and len(names) == 3
    # each pipelined case checked its contenders' outputs against each other
    for key in ("pipeline", "overhead", "fused", "load"):
        assert any(": agree" in n for n in cases[key]["notes"]), key


@pytest.mark.slow
def test_quick_benchmark_load_reports_compiles_and_memory(quick_run):
    case = next(c for c in quick_run[1]["cases"] if c["key"] == "load")
    combos = {(r["group"], r["name"]) for r in case["rows"]}
    assert len(combos) == 8  # nonfinite x accumulate x (hook, shim)
    for row in case["rows"]:
        extra = row["extra"]
        assert extra["compiles after warm-up"] >= 0 and extra["compiles"] >= 0
        assert extra["RSS growth"].endswith("MiB")
    rss = [t for t in case["targets"] if "RSS growth" in t["label"]]
    live = [t for t in case["targets"] if "live jax arrays growth" in t["label"]]
    assert len(rss) == len(live) == 8 == len(case["targets"]) // 2
    assert all(t["unit"] == " MiB" and t["bound"] == 5.0 for t in rss)
    assert all(t["bound"] == 0 for t in live)


@pytest.mark.slow
def test_quick_benchmark_lists_every_platform_target(quick_run):
    targets = [t for c in quick_run[1]["cases"] for t in c["targets"]]
    assert not [t["label"] for t in targets if "issue" in t["label"]]
    for start in PLATFORM_TARGETS:
        (t,) = [t for t in targets if t["label"].startswith(start)]
        judged_here = start.split(":")[0].lower() == quick_run[1]["env"]["jax_backend"]
        assert bool(t["pending"]) != judged_here, t


def test_targets_of_another_platform_are_listed_as_not_judged():
    res = CaseResult(key="k", title="t")
    res.targets.append(Target("measured", 2.0, ">=", 1.5))
    res.targets.append(Target("gpu goal", float("nan"), ">=", 1.5, pending="GPU runs only"))
    assert [t.met for t in res.targets] == [True, False]
    _, body = report.targets_table([res])
    assert body[0][-1] == "yes"
    assert body[1][2:] == ["", "", "not judged: GPU runs only"]
    assert "not judged: GPU runs only" in report.console(res)
    # results written before targets could be pending still render
    old = report._jsonable(res.targets[0])
    del old["pending"]
    assert report._target_row(old)[-1] == "yes"


@pytest.mark.slow
def test_quick_benchmark_loop_times_each_callback_at_two_batch_counts(quick_run):
    case = next(c for c in quick_run[1]["cases"] if c["key"] == "loop")
    callbacks = ["no callback", "anomalib 0.7 callback", "torch_compat callback"]
    for phase in ("validate", "test"):
        whole = {}
        for row in case["rows"]:
            if row["group"].startswith(f"{phase}, ") and row["group"].endswith("whole run"):
                whole.setdefault(row["group"], []).append(row["name"])
                assert row["timing"]["best"] > 0
        assert len(whole) == 2, whole  # two batch counts
        assert all(names == callbacks for names in whole.values())
        (split,) = {r["group"] for r in case["rows"] if r["group"].startswith(f"{phase}: per")}
        rows = {r["name"]: r["extra"] for r in case["rows"] if r["group"] == split}
        assert list(rows) == callbacks
        assert all(rows[n]["per batch"] and rows[n]["per run"] for n in callbacks)
        assert all(rows[n]["+ per batch"] and rows[n]["+ per run"] for n in callbacks[1:])
    notes = " ".join(case["notes"])
    assert notes.count(": agree") == 2, notes  # statistics and test outputs, shim vs anomalib


@pytest.mark.slow
def test_loop_case_lets_no_warning_escape():
    # In this process pytest turns every warning into an error (filterwarnings=error), which
    # the subprocess of the quick run does not: Lightning's advice and logs must stay inside.
    from benchmarks.cases import base, lightning_loop

    threads = lightning_loop.torch.get_num_threads()
    res = lightning_loop.run(base.RunConfig.make(quick=True))
    assert not res.skipped and not res.error and res.rows
    assert lightning_loop.torch.get_num_threads() == threads  # put back as it was


def _results_copy(tmp_path: Path) -> Path:
    """The committed results of the full runs, in a directory the test may add to."""
    out = tmp_path / "results"
    out.mkdir()
    for path in RESULTS.glob("*.json"):
        shutil.copy(path, out / path.name)
    return out


def _readme(tmp_path: Path) -> Path:
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# Title\n\nBefore.\n\n{report.README_START}\nold block\n{report.README_END}\n\nAfter.\n"
    )
    return readme


def test_replot_rebuilds_docs_and_readme_from_stored_results(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the demo extra)")
    results, docs = _results_copy(tmp_path), tmp_path / "docs" / "_generated"
    readme = _readme(tmp_path)
    stored = sorted(p.name for p in results.iterdir())
    rc = bench_main.main(
        ["--replot", "--out", str(results), "--docs", str(docs), "--readme", str(readme)]
    )
    assert rc == 0
    assert sorted(p.name for p in results.iterdir()) == stored  # nothing measured or written

    png = (docs / publish.PLOT_PNG).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    md = (docs / publish.DOCS_MD).read_text()
    assert md.splitlines()[0].startswith("<!-- Generated by `python -m benchmarks`")
    full = [
        json.loads(p.read_text())
        for p in results.glob("*.json")
        if "--cases" not in json.loads(p.read_text())["argv"]
    ]
    assert full, "no full run is committed in benchmarks/results"
    for data in full:  # every machine's full run, every case's table and every target
        assert f"### {data['env']['machine']}" in md
        for case in data["cases"]:
            assert f"**{case['key']}**: {case['title']}" in md
            for t in case["targets"]:
                label = publish._ISSUE.sub("", t["label"])  # goals once named their issue
                assert "issue" not in label
                assert report._md_table(["x"], [[label]]).splitlines()[-1][2:-2] in md

    text = readme.read_text()
    assert text.startswith("# Title\n\nBefore.\n\n") and text.endswith("\n\nAfter.\n")
    block = text[text.index(report.README_START) : text.index(report.README_END)]
    assert "old block" not in block
    assert len(block.splitlines()) + 1 <= publish.README_LINES
    assert "](docs/_generated/benchmark-ratios.png)" in block
    assert "](docs/performance.md)" in block
    assert (docs / publish.HEADLINE_MD).read_text().startswith(publish.GENERATED)
    for data in full:
        assert data["env"]["machine"] in block


def _stored_case(key: str, seconds: dict[str, float], group: str = "one group") -> dict:
    """A stored case of one group: each contender's time, anomalib's row first."""
    rows = [
        Row(
            group=group,
            name=name,
            role="baseline" if name.startswith("anomalib") else "jaxnorm",
            timing=Timing(number=1, samples=(t,)),
        )
        for name, t in seconds.items()
    ]
    return report._jsonable(CaseResult(key=key, title=f"{key} title", rows=rows))


def _env(machine: str, date: str, platform: str = "cpu", cpu: str = "Test CPU") -> dict:
    """A stored run's environment (``environment.describe()``), made up."""
    return {
        "machine": machine,
        "date": f"{date} 00:00 UTC",
        "python": "3.11.7",
        "jax": "0.0.test",
        "jaxlib": "0.0.test",
        "torch": "0.0.test",
        "numpy": "0.0.test",
        "jax_backend": platform,
        "jax_device": "cpu" if platform == "cpu" else "Test GPU",
        "torch_device": "cpu" if platform == "cpu" else "cuda",
        "cpu": cpu,
        "cpu_cores": 2,
    }


def _store(results: Path, stem: str, env: dict, cases: list, argv: tuple = ()) -> None:
    results.mkdir(exist_ok=True)
    payload = {"env": env, "argv": list(argv), "cases": cases}
    (results / f"{stem}.json").write_text(json.dumps(payload))


_F32 = L.array_group(L.MAPS_256, "float32")


def _normalize_case(speedup: float, baseline: str = L.ANOMALIB_NORMALIZE) -> dict:
    """The ``normalize`` case as a run stores it: anomalib ``speedup`` times jaxnorm's time."""
    return _stored_case("normalize", {baseline: speedup, L.NORMALIZE: 1.0}, group=_F32)


def test_replot_adds_cases_of_a_partial_run_of_the_same_machine(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the demo extra)")
    # A case that runs only where its library is installed (anomalib 2's post-processor) is
    # published from its own run, beside the machine's full run. The fixture is made here:
    # no test depends on the machine that runs it.
    results, machine = tmp_path / "results", "cpu-made-up-2c"
    _store(results, machine, _env(machine, "2030-01-01"), [_normalize_case(4.0)])
    times = {L.ANOMALIB2_POSTPROCESSOR: 3.0, L.POSTPROCESSOR: 1.0}
    case = _stored_case("postprocessor", times, group="test, normalize + labels, 12 batches")
    validation = "validation, F1 thresholds + min/max, 4 batches + epoch end"
    case["rows"] += _stored_case("postprocessor", times, group=validation)["rows"]
    supplement = [case]
    _store(
        results,
        f"{machine}-postprocessor",
        _env(machine, "2030-01-02"),
        supplement,
        argv=("--cases", "postprocessor"),
    )
    (run,) = publish.load_runs(results)
    assert run.name == machine
    assert [c.key for c in run.cases] == ["normalize", "postprocessor"]
    (test,) = [h for h in headlines.HEADLINES if h.label == "anomalib 2 PostProcessor, test"]
    assert headlines.ratio(test, run) == pytest.approx(3.0)

    docs = tmp_path / "docs"
    publish.publish(results, docs, None)
    md = (docs / publish.DOCS_MD).read_text()
    assert f"`{machine}-postprocessor.json` (2030-01-02 00:00 UTC)" in md
    assert "**postprocessor**: postprocessor title" in md
    assert (docs / publish.PLOT_PNG).is_file()


def test_publish_fails_loudly_on_a_renamed_contender(tmp_path):
    # A stored run measured the headline's case under a contender name that no longer
    # exists: the figure must not vanish from the README in silence.
    results = tmp_path / "results"
    renamed = _normalize_case(4.0, baseline="anomalib 0.7 normalize (an old name)")
    _store(results, "cpu-made-up-2c", _env("cpu-made-up-2c", "2030-01-01"), [renamed])
    with pytest.raises(headlines.MissingRow, match=r"anomalib 0\.7 normalize \(torch eager\)"):
        publish.publish(results, tmp_path / "docs", _readme(tmp_path))
    # A run that did not measure the case at all shows "–", as before.
    _store(results, "cpu-made-up-2c", _env("cpu-made-up-2c", "2030-01-01"), [])
    publish.publish(results, tmp_path / "docs", None, write_docs=False)


def test_headline_shows_the_newest_current_run_of_each_platform(tmp_path, monkeypatch):
    # Three stored runs: an older CPU, a newer one of another CPU (as `make bench` on another
    # machine leaves them), and a GPU run of a replaced design.
    results = tmp_path / "results"
    _store(results, "cpu-old-2c", _env("cpu-old-2c", "2030-01-01", cpu="Old CPU"),
           [_normalize_case(2.0)])  # fmt: skip
    _store(results, "cpu-new-2c", _env("cpu-new-2c", "2030-02-01", cpu="New CPU"),
           [_normalize_case(5.0)])  # fmt: skip
    _store(results, "gpu-made-up", _env("gpu-made-up", "2030-03-01", "gpu"),
           [_normalize_case(0.5)])  # fmt: skip
    monkeypatch.setitem(publish.SUPERSEDED, ("gpu-made-up", "2030-03-01"), "an old design")
    runs = publish.load_runs(results)
    assert [r.name for r in runs] == ["cpu-new-2c", "cpu-old-2c", "gpu-made-up"]
    assert [r.name for r in publish.headline_runs(runs)] == ["cpu-new-2c"]

    readme = _readme(tmp_path)
    publish.publish(results, tmp_path / "docs", readme)
    block = readme.read_text()
    table = [line for line in block.splitlines() if line.startswith("|")]
    assert table[0] == "| | cpu-new-2c |"
    assert "| normalize, (32, 1, 256, 256) f32 | 5.00x |" in table
    assert not [line for line in table if "0.50x" in line or "2.00x" in line]
    assert "GPU: not measured for the current code" in block
    assert "**gpu-made-up** (Test GPU, 2030-03-01), measured an old design" in block
    assert "Older runs, in the full results only: **cpu-old-2c** (Old CPU, 2030-01-01)" in block
    md = (tmp_path / "docs" / publish.DOCS_MD).read_text()
    gpu = md[md.index("### gpu-made-up") :]
    assert gpu.splitlines()[2].startswith("**Not today's speed:** this run measured an old")
    old = md[md.index("### cpu-old-2c") : md.index("### gpu-made-up")]
    assert "**An older run:** the headline shows **cpu-new-2c**" in old
    assert (tmp_path / "docs" / publish.HEADLINE_MD).read_text().count("| 5.00x |") == 1


def test_stored_gpu_run_of_the_replaced_design_is_not_a_headline(tmp_path):
    # The H200 run stored in benchmarks/results measured a design replaced since: its
    # figures must not read as today's GPU speed.
    results, readme = _results_copy(tmp_path), _readme(tmp_path)
    publish.publish(results, tmp_path / "docs", readme)
    block = readme.read_text()
    header = next(line for line in block.splitlines() if line.startswith("| |"))
    assert "gpu" not in header
    assert "GPU: not measured for the current code" in block
    h200 = next(r for r in publish.load_runs(results) if r.name == "gpu-nvidia-h200")
    assert h200.superseded and f"**{h200.name}** (NVIDIA H200, 2026-11-26)" in block


def test_machine_name_can_be_set(monkeypatch):
    monkeypatch.setenv(environment.MACHINE_ENV, "My Bench Box")
    assert environment.machine_name() == "my-bench-box"
    assert environment.describe()["machine"] == "my-bench-box"


def test_replot_without_matplotlib_skips_the_plot_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    results, docs = _results_copy(tmp_path), tmp_path / "docs"
    readme = _readme(tmp_path)
    rc = bench_main.main(
        ["--replot", "--out", str(results), "--docs", str(docs), "--readme", str(readme)]
    )
    assert rc == 0
    assert "skipped the plot" in capsys.readouterr().out
    assert (docs / publish.DOCS_MD).is_file() and not (docs / publish.PLOT_PNG).exists()
    block = readme.read_text()
    assert "benchmark-ratios.png" not in block and "performance.md" in block


def test_stored_results_load_back_as_they_were_written():
    data = json.loads(next(RESULTS.glob("cpu-*.json")).read_text())
    cases = [case_from_json(c) for c in data["cases"]]
    # As JSON text: pending targets hold NaN, which equals nothing.
    assert json.dumps(report._jsonable(cases)) == json.dumps(data["cases"])


@pytest.mark.slow
def test_every_headline_figure_is_found_in_a_run(quick_run):
    # The plot and the README find their rows by case, group and row names: a renamed row
    # would silently drop a figure.
    path, data = quick_run
    run = publish.Run(
        name=data["env"]["machine"],
        env=data["env"],
        path=path,
        argv=data["argv"],
        cases=[case_from_json(c) for c in data["cases"]],
    )
    # anomalib 2's case runs in its own environment (make bench-anomalib2)
    measured = [h for h in headlines.HEADLINES if run.case(h.case) is not None]
    assert {h.case for h in headlines.HEADLINES} - {h.case for h in measured} <= {"postprocessor"}
    missing = [h.label for h in measured if not headlines.ratio(h, run)]
    assert not missing
    for phase in ("validate", "test"):
        assert headlines.loop_extras(run, phase).startswith("shim ")


def test_gpu_check_names_test_files_that_exist():
    """benchmarks/gpu/gpu_check.sh runs on a lent GPU machine, where a missing file costs device
    time: every test file it names must exist (it also refuses to start without one)."""
    script = (ROOT / "benchmarks" / "gpu" / "gpu_check.sh").read_text()
    named = re.findall(r"tests/[\w/]+\.py", script)
    assert named, "gpu_check.sh names no test file"
    missing = [name for name in named if not (ROOT / name).is_file()]
    assert not missing, missing
