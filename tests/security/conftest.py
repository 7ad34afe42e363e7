"""The security tier reuses the chart tier's real helm (tests/chart/conftest.py)."""

from tests.chart.conftest import helm, render

__all__ = ["helm", "render"]
