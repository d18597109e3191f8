"""Cluster entrypoint for the evaluate stage: `python ray_jobs/evaluate.py EVALUATE.yaml`.

The file is an evaluate stage (kind: evaluate, with `adapter:` set); it runs as a one-stage
pipeline, so it gets the same MLflow runs, Ray connection (RAY_ADDRESS) and errors as `loraforge run`.
"""

import sys
from pathlib import Path

# A shipped working dir must win over any installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from loraforge.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["run", *sys.argv[1:], "--name", "evaluate"])
