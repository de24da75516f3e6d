"""The package finds its run-time files (kernel sources, golden suite), installed or in a checkout."""

import json
import os

import pytest

import refslm
from refslm.resources import golden_dir, kernels_dir


def test_kernel_sources_and_golden_suite_are_found():
    assert sorted(p.name for p in (kernels_dir() / "opencl").glob("*.cl"))
    manifest = json.loads((golden_dir() / "manifest.json").read_text())
    assert manifest["cases"]
    for case in manifest["cases"]:
        assert (golden_dir() / case["file"]).is_file(), case["file"]


def test_ci_tests_the_installed_wheel_not_the_checkout():
    """.ci/run sets REFSLM_EXPECT_INSTALLED: the suite must then import refslm from site-packages."""
    if not os.environ.get("REFSLM_EXPECT_INSTALLED"):
        pytest.skip("REFSLM_EXPECT_INSTALLED not set (a checkout run)")
    assert "site-packages" in refslm.__file__, refslm.__file__
    assert "_data" in str(kernels_dir()) and "_data" in str(golden_dir())
