"""Runs again, alone and one after another, the tests that failed or erred in a JUnit XML
report (``pytest --junitxml``), e.g. after a parallel run:

    python benches/rerun_failed.py cuda_tests.xml [pytest options ...]

Exit status: pytest's for the rerun (0: every one passed alone), 0 when nothing failed.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

import pytest


def failed_ids(report: str) -> list[str]:
    """The node ids (``tests/test_x.py::test_y[param]``) of the failed or erred test cases."""
    ids = []
    for case in ET.parse(report).iter("testcase"):
        if case.find("failure") is None and case.find("error") is None:
            continue
        module, name = case.get("classname") or "", case.get("name") or ""
        if not module or not name:
            continue
        parts = module.split(".")
        # classname is "tests.test_x" or "tests.test_x.TestClass"
        path = next((i for i in range(len(parts), 0, -1) if parts[i - 1].startswith("test_")), len(parts))
        node = "/".join(parts[:path]) + ".py" + "".join(f"::{p}" for p in parts[path:]) + f"::{name}"
        ids.append(node)
    return ids


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    ids = failed_ids(argv[0])
    print(f"{len(ids)} test(s) to run again alone", flush=True)
    for i in ids:
        print(f"  {i}", flush=True)
    if not ids:
        return 0
    return int(pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", *argv[1:], *ids]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
