"""Fixtures shared by the chart tests."""

from collections.abc import Iterator

import helm_python as helm
import pytest

from tests.deploy.chart_support import CHART


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    """The chart, loaded once per test module."""
    with helm.Chart.load(CHART) as loaded:
        yield loaded
