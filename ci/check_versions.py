"""Fails unless every ``name==version`` pin of a requirements/constraints file is installed.

pip resolves constraints, but a package that was already present, or a pin that names an
extra, can leave another version in place; this check makes an environment that claims to
test a version prove it.

Usage: python ci/check_versions.py FILE [FILE...]
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

_PIN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;#]+)")


def main(paths: list[str]) -> int:
    wrong = []
    for path in paths:
        with open(path) as f:
            for line in f:
                pin = _PIN.match(line)
                if not pin:
                    continue
                name, _, want = pin.groups()
                try:
                    have = metadata.version(name)
                except metadata.PackageNotFoundError:
                    wrong.append(f"{name}: not installed, {path} pins {want}")
                    continue
                # A local build tag (+cpu, +cu121) does not change the release.
                if have.split("+")[0] != want.split("+")[0]:
                    wrong.append(f"{name}: {have} installed, {path} pins {want}")
    for w in wrong:
        print(w, file=sys.stderr)
    if not wrong:
        print(f"versions as pinned in {', '.join(paths)}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
