"""A DVC stage must run the code DVC hashed for it: this checkout's ``cdsam/``.

``python stages/train.py`` puts ``stages/`` on ``sys.path``, not the checkout, so a plain
``import cdsam`` finds whichever cdsam is installed: another clone's editable install, a
non-editable ``pip install .``, or the main checkout when DVC runs ``dvc exp run --temp/--queue``
in a copy. DVC would rerun a stage because its deps changed, run other code, and record hashes
of code that did not make the outputs. Each stage script therefore puts its checkout first on
``sys.path`` and calls :func:`require_checkout`, which stops with one line when that did not work.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cdsam


def require_checkout(script: str) -> Path:
    """The checkout ``script`` (``<checkout>/stages/x.py`` or ``tools/x.py``) belongs to, or exit 2 with one line
    naming the cdsam that was imported and the one that was expected."""
    root = Path(script).resolve().parents[1]
    expected = root / "cdsam"
    found = Path(cdsam.__file__).resolve().parent
    if found != expected:
        folder = Path(script).resolve().parent.name
        print(f"error: {Path(script).name}: imported cdsam from {found}, expected this "
              f"checkout's {expected} (the code beside the script, which DVC hashes for a "
              f"stage); run it from a checkout that has cdsam/ next to {folder}/",
              file=sys.stderr)
        sys.exit(2)
    return root
