"""Architecture of the shipped reference CNN.

Four convolutional blocks (two 3x3 convolutions with BatchNorm and ReLU each); blocks 1-3
end in a 2x2 max-pool, block 4 in the global-average-pooling head, so block-wise methods
(SISE) and CAM methods apply. Every ReLU is its own module and none is in-place, so hook-
based methods (guided back-propagation, DeepLIFT) see each activation once.
"""

from __future__ import annotations

from torch import Tensor, nn

WIDTHS = (16, 32, 64, 128)


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class ReferenceCNN(nn.Module):
    """Small GAP-headed CNN: ``block1..block4 -> pool -> fc``.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    widths : tuple of int
        Channels of the four blocks.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        cin = 3
        for i, w in enumerate(widths, start=1):
            layers = _conv(cin, w) + _conv(w, w)
            if i < len(widths):
                layers.append(nn.MaxPool2d(2))
            setattr(self, f"block{i}", nn.Sequential(*layers))
            cin = w
        self.n_blocks = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of normalised images, shape (N, num_classes)."""
        for i in range(1, self.n_blocks + 1):
            x = getattr(self, f"block{i}")(x)
        return self.fc(self.flatten(self.pool(x)))
