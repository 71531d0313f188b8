"""What ships with attriflow: the embedded dataset recipe and the reference CNN.

``data/reference_cnn.pt`` holds the trained weights (loaded with ``weights_only=True``)
and ``data/reference_cnn.json`` the training record (accuracy, seed, configuration).
"""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
REFERENCE_WEIGHTS = DATA_DIR / "reference_cnn.pt"
REFERENCE_RECORD = DATA_DIR / "reference_cnn.json"
