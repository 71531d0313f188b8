"""Shared fixtures: an isolated Prefect home, one test server per session, tiny models."""

from __future__ import annotations

import os
import tempfile

# Before Prefect is imported anywhere: keep its database and settings out of ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="attriflow-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API server for the whole session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


class TinyCNN(nn.Module):
    """Two conv blocks and a GAP head: the smallest model every method applies to."""

    def __init__(self, classes: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        return self.fc(self.flat(self.gap(self.relu2(self.conv2(x)))))


@pytest.fixture
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().double().eval()


@pytest.fixture
def tiny_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, 12, 12, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
