"""The demo (``python -m jaxnorm.demo``) end to end with tiny settings, and its helpers."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxnorm.demo import main
from jaxnorm.demo import metrics as M
from jaxnorm.demo.data import MARGIN, NORMAL, make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "--image-size",
    "16",
    "--train-size",
    "32",
    "--val-size",
    "16",
    "--test-size",
    "16",
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--no-progress",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_output")
    return main([*TINY, "--out", str(out)]), out


def test_normalization_keeps_image_ranking_and_decisions(demo_run):
    r, _ = demo_run
    # Validation maps cover the range of the test image scores, so no image score is
    # clipped across classes and the ranking, hence AUROC, is unchanged.
    assert r["image_auroc"]["raw"] == r["image_auroc"]["normalized"]
    # normalized >= 0.5 exactly when raw >= threshold: identical decisions.
    assert r["image_decisions_differ"] == 0
    assert r["image_f1"]["raw"] == r["image_f1"]["normalized"]
    assert r["pixel_decisions_differ"] == 0
    assert r["pixel_f1"]["raw"] == r["pixel_f1"]["normalized"]
    assert r["nnx_metric_agrees"]


def test_pixel_auroc_changes_only_through_clipping_or_rounding(demo_run):
    r, _ = demo_run
    raw, norm = r["pixel_auroc"]["raw"], r["pixel_auroc"]["normalized"]
    c = r["pixel_clipped"]
    cross_class_ties = c["anomalous_at_0"] + c["normal_at_1"]
    # With these tiny settings the model is barely trained: many pixels fall below
    # threshold - range / 2 and clip to 0, anomalous ones among them. That is what the
    # table's note reports; without such ties only float32 rounding could move AUROC.
    assert cross_class_ties > 0 or abs(raw - norm) < 1e-6


def test_writes_stats_json_and_figure(demo_run):
    r, out = demo_run
    with open(out / "stats.json") as f:
        meta = json.load(f)
    assert set(meta) >= {"image_threshold", "pixel_threshold", "min", "max"}
    for key in ("image_threshold", "pixel_threshold", "min", "max"):
        assert meta[key] == pytest.approx(r["stats"][key], rel=1e-6)
    assert meta["min"] < meta["image_threshold"] < meta["max"]

    import matplotlib.image

    assert r["figure"] == str(out / "normalization.png")
    with open(r["figure"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(r["figure"]).shape
    assert width > 800 and height > 800


def test_prints_the_table(tmp_path, capsys):
    r = main([*TINY, "--epochs", "1", "--no-plot", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    for needle in ("image AUROC", "image F1", "pixel AUROC", "min, max", "time (s)", "XLA compile"):
        assert needle in text
    assert r["figure"] is None and not (tmp_path / "normalization.png").exists()
    assert (tmp_path / "stats.json").exists()
    assert set(r["timings"]) >= {"train", "validation", "test", "compile", "total"}


# The demo with matplotlib and tqdm uninstalled (the `demo` extra left out): an import hook
# makes them fail as pip would leave them, and training announces its start.
_WITHOUT_THE_EXTRA = """
import sys


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("matplotlib", "tqdm"):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
import jaxnorm.demo.run as run

fit = run._fit
run._fit = lambda *args: (print("training starts", flush=True), fit(*args))[1]
run.main({argv!r})
"""


def test_without_the_demo_extra_says_what_to_install_and_prints_the_table(tmp_path):
    argv = [a for a in TINY if a != "--no-progress"] + ["--epochs", "1", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_THE_EXTRA.format(argv=argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    start = lines.index("training starts")
    said = [line for line in lines[:start] if "is not installed" in line]
    assert [line.split()[0] for line in said] == ["matplotlib", "tqdm"]  # before training
    assert all('pip install "jaxnorm[demo]"' in line for line in said)
    assert "without its figure" in said[0] and "without a progress bar" in said[1]
    table = "\n".join(lines[start:])
    for needle in ("image AUROC", "pixel F1", "min, max", "time (s)"):
        assert needle in table
    assert lines[-2:] == said  # and again under the table
    assert (tmp_path / "stats.json").exists() and not (tmp_path / "normalization.png").exists()


def test_help_exits_zero():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxnorm.demo", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for flag in (
        "--epochs",
        "--train-size",
        "--val-size",
        "--test-size",
        "--image-size",
        "--batch-size",
        "--seed",
        "--out",
        "--no-plot",
    ):
        assert flag in proc.stdout


def test_rejects_bad_image_size(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--image-size", "60"])
    assert e.value.code == 2
    assert "multiple of 8" in capsys.readouterr().err


@pytest.mark.parametrize("size", [8, 16])
def test_dataset_is_deterministic_and_labelled(size):
    # Small images are where a thin defect could miss every pixel centre: masks must not
    # be empty on anomalous images, or the pixel threshold has nothing to tune on.
    a = make_dataset(3, train_size=8, val_size=30, test_size=32, image_size=size)
    b = make_dataset(3, train_size=8, val_size=30, test_size=32, image_size=size)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.frames, y.frames)
        np.testing.assert_array_equal(x.masks, y.masks)
    train, val, test = a
    assert train.frames.shape == (8, size + 2 * MARGIN, size + 2 * MARGIN)
    assert train.images.shape == train.masks.shape == (8, size, size)
    assert not train.labels.any() and not train.masks.any()  # train on normal images only
    for split in (val, test):
        assert split.labels.sum() == len(split) // 2
        has_defect = split.masks.reshape(len(split), -1).any(axis=1)
        np.testing.assert_array_equal(has_defect, split.labels == 1)
        np.testing.assert_array_equal(split.kinds == NORMAL, split.labels == 0)
        assert split.frames.dtype == np.float32
        assert 0 <= split.frames.min() and split.frames.max() <= 1


def brute_auroc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    return float(np.mean(wins))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, size=40).astype(np.float32)  # many ties
    y = rng.integers(0, 2, size=40)
    assert M.auroc(s, y) == pytest.approx(brute_auroc(s, y), abs=1e-12)


def test_metric_edge_cases():
    assert np.isnan(M.auroc([0.1, 0.2], [0, 0]))
    assert M.auroc([0.1, 0.9], [0, 1]) == 1.0
    assert M.auroc([0.5, 0.5], [0, 1]) == 0.5
    assert M.f1_score(np.zeros(3, bool), np.zeros(3)) == 1.0
    with pytest.raises(ValueError, match="labels has"):
        M.auroc([0.1, 0.2], [0, 1, 1])
