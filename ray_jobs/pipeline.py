"""Cluster entrypoint for a whole pipeline (or one stage): `python ray_jobs/pipeline.py JOB.yaml`.

`loraforge submit` runs this on the cluster with the job file in $LORAFORGE_JOB_SPEC.
"""

import sys
from pathlib import Path

# A shipped working dir must win over any installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from loraforge.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["run", *sys.argv[1:]])
