"""Training pipeline of edgekv's learned KV bit-width controller.

    python -m controller.rarity    # prior token-frequency table (rarity feature)
    python -m controller.train     # features + oracle labels -> scikit-learn -> ONNX artifact

The artifact lands in python/edgekv/data/ and is loaded at run time by
``edgekv.controller.LearnedPolicy`` (``kv="adaptive"``).
"""

import sys as _sys
from pathlib import Path as _Path

# run from a source checkout: make the package under python/ importable without PYTHONPATH
_PY = _Path(__file__).resolve().parent.parent / "python"
if _PY.is_dir() and str(_PY) not in _sys.path:
    _sys.path.insert(0, str(_PY))
