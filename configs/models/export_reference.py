"""Export the shipped reference CNN as a ``torch.export`` program for configs/exported.yaml.

    .venv/bin/python configs/models/export_reference.py

The batch dimension is dynamic (explainers evaluate batches of any size); the program holds
the trained weights, so it is explained exactly like ``model.arch: reference``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attriflow.data import REFERENCE_WEIGHTS
from attriflow.data.reference_cnn import ReferenceCNN

OUT = Path(__file__).with_name("reference_cnn.pt2")


def export(out: Path = OUT) -> Path:
    """Write the program to ``out`` and return the path."""
    model = ReferenceCNN()
    model.load_state_dict(torch.load(REFERENCE_WEIGHTS, weights_only=True))
    model.eval()
    example = torch.zeros(2, 3, 64, 64)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, out)
    return out


if __name__ == "__main__":
    print(export())
