"""JupyterHub's config file for kernelfleet: ``jupyterhub -f hub/jupyterhub_config.py``.

Reads the platform config named by $KERNELFLEET_CONFIG (default: kernelfleet.yaml in the
current folder) and applies hub.config.configure. All settings live in hub/config.py.
"""

import os

from hub.config import configure
from kernelfleet.config import DEFAULT_CONFIG, load_config

c = get_config()  # type: ignore[name-defined]  # noqa: F821 - provided by traitlets
configure(c, load_config(os.environ.get("KERNELFLEET_CONFIG", DEFAULT_CONFIG)))
