"""A short example: collect statistics on validation scores, normalize test scores."""

import numpy as np

import jaxnorm


def main() -> None:
    rng = np.random.default_rng(0)
    val = rng.gamma(2.0, 1.5, size=(8, 64)).astype(np.float32)
    stats = jaxnorm.MinMax.empty()
    for batch in val:
        stats = stats.update(batch)
    threshold = float(np.quantile(val, 0.95))
    test = rng.gamma(2.0, 1.5, size=16).astype(np.float32)
    print(f"stats: min={float(stats.min):.3f} max={float(stats.max):.3f} threshold={threshold:.3f}")
    normalized = np.asarray(jaxnorm.normalize(test, threshold, stats.min, stats.max))
    for raw, norm in zip(test, normalized, strict=True):
        print(f"raw {raw:7.3f} -> normalized {norm:.3f} {'anomalous' if norm > 0.5 else ''}")


if __name__ == "__main__":
    main()
