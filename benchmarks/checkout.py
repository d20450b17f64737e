"""Imported first by every benchmark: puts the checkout this folder lives in at the head of ``sys.path``, so
``python benchmarks/NAME.py`` measures this tree's speakerid, not whichever one is installed (an editable install of
another clone or worktree would otherwise win, and a before/after comparison would measure one side twice)."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path[:1] != [ROOT]:
    sys.path.insert(0, ROOT)
