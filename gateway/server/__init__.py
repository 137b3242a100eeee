"""kernelfleet's code inside Jupyter Enterprise Gateway 3.3 (runs in ``.venv-gateway``).

Start it with ``python -m gateway.server --config <file.py>``; the app is
:class:`gateway.server.app.KernelfleetGatewayApp`. This package imports nothing from
``scheduler``, ``hub`` or ``kernelfleet``: components talk over HTTP (docs/contracts.md).
Importing this package itself does not import EG, so its pure modules (``identity``,
``policy``, ``scheduler``, ``reconnect``) can be tested from any environment.
"""
