"""What every stage function receives besides its own spec."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraforge.tracking import RunRef


@dataclass
class StageContext:
    run_dir: Path  # this pipeline run's output folder; a stage writes under run_dir / <stage>
    model: str  # resolved base model: a local folder or an HF hub id
    run: RunRef | None = None  # this stage's MLflow child run (None: no tracking)
    seed: int = 0
    model_ref: str | None = None  # the job file's model reference ('lab', hub id, folder)

    def stage_dir(self, stage: str) -> Path:
        path = self.run_dir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path
