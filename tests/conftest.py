"""Session-wide: the production image tests run last, their images built meanwhile."""

from __future__ import annotations

import pytest

PRODUCTION = "tests/e2e/test_production_image.py"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Move the production image tests to the end and start building their two images
    in the background now (~5 min of mirror downloads and mksquashfs that the rest of
    the suite would otherwise wait for); the fixture that needs them joins the build."""
    production = [item for item in items if item.nodeid.startswith(PRODUCTION)]
    if not production or config.getoption("collectonly"):
        return
    items[:] = [item for item in items if not item.nodeid.startswith(PRODUCTION)] + production
    from tests.e2e.test_production_image import start_prebuild

    start_prebuild()
