"""The notebooks are executed by the suite (nbmake). Their kernels import the checkout, experiments/ included
(a folder of studies that is not installed), so the checkout goes on the kernels' PYTHONPATH."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
