"""Prerequisites of tests that need root, a server program or a network: skipped with a reason on a user's machine
that lacks them, a failure in CI (``CI=true``), where ``.ci/run`` installs and starts everything the tests need."""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    """True on the CI machine (``CI=true``), where no test may skip for a missing prerequisite."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(available: bool, reason: str) -> None:
    """Skip the calling test with ``reason`` unless ``available``; in CI fail instead (a missing prerequisite there
    is a broken CI setup, not a reason to test less)."""
    if available:
        return
    if in_ci():
        pytest.fail(f"CI=true but a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    """The test creates network namespaces, links or system users: it needs root."""
    require(os.geteuid() == 0, "needs root (network namespaces, veth links, sshd)")


def require_program(path_or_name: str, install: str) -> str:
    """The full path of a program the test runs, e.g. ``/usr/sbin/sshd`` (``install`` says how to get it)."""
    found = path_or_name if os.path.isabs(path_or_name) and os.access(path_or_name, os.X_OK) else (
        shutil.which(path_or_name))
    require(found is not None, f"{path_or_name} is not installed ({install})")
    assert found is not None
    return found
