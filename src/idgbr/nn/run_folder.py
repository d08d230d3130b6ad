"""The folder a training run writes (``idgbr train --out RUN``): where its complete checkpoints are.

The training loop writes them (:mod:`idgbr.training.checkpoints`); ``Refiner.from_pretrained`` reads this to name the
latest one when a run did not finish.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
TRAINING_STATE = "training_state.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)``, oldest first; partial (temporary) folders are ignored."""
    folder = Path(run_dir) / "checkpoints"
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = CHECKPOINT_RE.match(path.name)
            if match and path.is_dir() and (path / TRAINING_STATE).exists() and (path / "config.json").exists():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None
