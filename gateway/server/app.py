"""``KernelfleetGatewayApp``: Jupyter Enterprise Gateway 3.3 with kernelfleet's rules.

Run it from EG's environment::

    .venv-gateway/bin/python -m gateway.server --config .kernelfleet/gateway_config.py

and configure it the traitlets way (``c.KernelfleetGatewayApp.hub_api_url = ...``); EG's own
traits (``c.EnterpriseGatewayApp.port``, ``ip``, ...) keep working. Kernelspecs are found the
usual Jupyter way (``JUPYTER_PATH``/``kernels``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from enterprise_gateway.enterprisegatewayapp import EnterpriseGatewayApp
from tornado import ioloop
from traitlets import Float, TraitError, Type, Unicode, default, validate

from .auth import RESOLVER_SETTING, log_request
from .channels import STALE_TIMEOUT_SETTING
from .compliance_config import ComplianceConfigError, ComplianceSettings
from .eviction_notice import notice_handlers
from .fastdates import install_fast_dates
from .handlers import kernelfleet_handlers
from .identity import HubIdentityResolver
from .manager import KernelfleetMappingKernelManager
from .metrics import metrics_handlers
from .ports import below_ephemeral_range
from .redaction import install_redaction
from .scheduler import NoScheduler, Scheduler, SchedulerClient


class StartupError(Exception):
    """A configuration problem found at start-up: which setting, and why."""


class KernelfleetGatewayApp(ComplianceSettings, EnterpriseGatewayApp):
    """Enterprise Gateway with hub identities, owned kernels, curated kernelspecs and admission.

    Every request is authenticated with the caller's JupyterHub API token (no shared EG
    token); each kernel belongs to the user who started it, starts only after the scheduler
    admits it, runs with ``HOME`` and working dir ``<kernel_home_root>/<user>``, and has its
    lease released when it ends. Kernels get their kernelspec's secrets, and every start,
    stop and execution goes into the audit trail (compliance_config.py has those settings).
    """

    name = "kernelfleet-gateway"
    description = "Jupyter Enterprise Gateway with kernelfleet's identity, ownership and admission."

    @default("raise_config_file_errors")
    def _default_raise_config_file_errors(self) -> bool:
        # Stock Jupyter logs a broken config file and starts with defaults: for a gateway that
        # would mean no scheduler or the wrong hub, so fail instead.
        return True

    @default("port_range")
    def _default_port_range(self) -> str:
        # Stock "0..0" binds to port 0: kernels' ports then come from the ephemeral range,
        # where every outgoing connection's local port comes from too, and one of those can
        # take a port between EG choosing it and the kernel binding it (bench/README.md).
        return os.getenv(self.port_range_env) or below_ephemeral_range()

    hub_api_url = Unicode(
        "http://127.0.0.1:8081/hub/api",
        help="""JupyterHub's API URL. Each request's token is resolved with GET <url>/user.
        Change it when the hub's API listens elsewhere.""",
    ).tag(config=True)

    @validate("hub_api_url")
    def _validate_hub_api_url(self, proposal: Any) -> str:
        value = str(proposal["value"]).rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise TraitError(f"hub_api_url must be an http(s) URL, not {value!r}")
        return value

    scheduler_url = Unicode(
        "",
        help="""The kernelfleet scheduler's URL (e.g. http://127.0.0.1:8300). Every kernel start
        asks it for an admission and every stop releases the lease. Empty: no scheduler, every
        start is admitted (tests and demos only).""",
    ).tag(config=True)

    @validate("scheduler_url")
    def _validate_scheduler_url(self, proposal: Any) -> str:
        value = str(proposal["value"]).rstrip("/")
        if value and not value.startswith(("http://", "https://")):
            raise TraitError(f"scheduler_url must be an http(s) URL or empty, not {value!r}")
        return value

    scheduler_token_file = Unicode(
        "",
        help="""File holding the scheduler's service token (secrets/scheduler_token), sent as
        'Authorization: token ...'. Required when scheduler_url is set.""",
    ).tag(config=True)

    scheduler_timeout = Float(
        10.0,
        help="Seconds to wait for the scheduler's answer before a start fails with 503.",
    ).tag(config=True)

    identity_cache_ttl = Float(
        60.0,
        help="""Seconds a resolved hub token stays cached. Lower it to see group or admin changes
        sooner, at the cost of more hub API calls.""",
    ).tag(config=True)

    hub_api_timeout = Float(
        30.0,
        help="""Seconds to wait for JupyterHub's API before a request fails with 503. A hub
        busy with many logins at once answers late, not never (50 users on a 2-core host:
        over 5 s); a kernel start that waits is better than one refused. A hub that is
        down fails at once whatever this is.""",
    ).tag(config=True)

    kernel_home_root = Unicode(
        "",
        help="""Folder holding users' homes: each user's kernels get HOME=<root>/<user> and run
        there (created, mode 0700, if missing). Default: .kernelfleet/home under the current
        directory.""",
    ).tag(config=True)

    @default("kernel_home_root")
    def _default_kernel_home_root(self) -> str:
        return os.path.abspath(os.path.join(".kernelfleet", "home"))

    admin_token_file = Unicode(
        "",
        help="""Optional file holding the hub API token of the gateway's own hub service
        (secrets/gateway_service_token). Whoever presents that token is admin: sees and may
        stop every kernel (the scheduler uses it to evict).""",
    ).tag(config=True)

    stale_connection_timeout = Float(
        1.0,
        help="""Seconds a stale channels connection with the same session id gets to close
        politely when a client reconnects, before it is dropped.""",
    ).tag(config=True)

    @validate(
        "scheduler_timeout", "identity_cache_ttl", "hub_api_timeout", "stale_connection_timeout"
    )
    def _validate_seconds(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if value < 0:
            raise TraitError(f"{proposal['trait'].name} must be 0 or more seconds, not {value}")
        return value

    kernel_manager_class = Type(
        klass=KernelfleetMappingKernelManager,
        default_value=KernelfleetMappingKernelManager,
        help="The kernel manager class; must subclass KernelfleetMappingKernelManager.",
    ).tag(config=True)

    identity_resolver: HubIdentityResolver
    scheduler: Scheduler

    def init_configurables(self) -> None:
        """EG's configurables, then kernelfleet's identity resolver and scheduler client."""
        install_fast_dates()  # jupyter_client 6 parses message dates slowly (fastdates.py)
        try:
            admin_token = _read_secret(self.admin_token_file, "admin_token_file")
            self.scheduler = self._make_scheduler()
            compliance = self.build_compliance()
        except (StartupError, ComplianceConfigError) as e:
            self.log.critical("%s", e)
            self.exit(1)
        super().init_configurables()
        self.identity_resolver = HubIdentityResolver(
            self.hub_api_url,
            ttl_s=self.identity_cache_ttl,
            admin_token=admin_token,
            timeout_s=self.hub_api_timeout,
        )
        self.kernel_manager.attach(
            scheduler=self.scheduler, kernel_home_root=os.path.abspath(self.kernel_home_root)
        )
        self.kernel_manager.compliance = compliance
        self.log.info(
            "kernelfleet: identities from %s, scheduler %s, homes under %s",
            self.hub_api_url,
            self.scheduler_url or "(none: every start admitted)",
            self.kernel_home_root,
        )

    def _make_scheduler(self) -> Scheduler:
        if not self.scheduler_url:
            return NoScheduler()
        if not self.scheduler_token_file:
            raise StartupError("scheduler_url is set but scheduler_token_file is not")
        token = _read_secret(self.scheduler_token_file, "scheduler_token_file")
        return SchedulerClient(self.scheduler_url, token, timeout_s=self.scheduler_timeout)

    def _create_request_handlers(self) -> list[tuple]:
        """``/metrics``, then EG's handlers wrapped with hub authentication and kernelfleet's rules.

        ``/metrics`` goes first: EG's table ends with a catch-all that would answer it.
        """
        wrapped = kernelfleet_handlers(super()._create_request_handlers())
        return metrics_handlers(self.base_url) + notice_handlers(self.base_url) + wrapped

    def init_webapp(self) -> None:
        """EG's web app, without its shared token, with kernelfleet's settings."""
        super().init_webapp()
        settings = self.web_app.settings
        if self.auth_token:
            self.log.warning("Ignoring EG's auth_token: kernelfleet authenticates with hub tokens")
        settings["eg_auth_token"] = ""
        settings[RESOLVER_SETTING] = self.identity_resolver
        settings[STALE_TIMEOUT_SETTING] = self.stale_connection_timeout
        settings["log_function"] = log_request
        # After EG's enable_pretty_logging(): every handler by now scrubs secret values.
        install_redaction(self.kernel_manager.compliance.values, [self.log])
        # traitlets leaves the app logger at DEBUG and filters in the handler: every debug
        # call (jupyter_server logs one per kernel message) built a record to drop it.
        self.log.setLevel(self.log_level)
        if self.log_level > logging.DEBUG:
            # httpx logs every request at INFO: one line per hub/scheduler call is noise.
            logging.getLogger("httpx").setLevel(logging.WARNING)

    def start(self) -> None:
        """Serve; the audit trail's first record from this process marks the start."""
        ioloop.IOLoop.current().add_callback(self.kernel_manager.compliance.trail.gateway_started)
        ioloop.IOLoop.current().add_callback(self.kernel_manager.warm.start)
        super().start()

    def shutdown(self) -> None:
        """Shut kernels down (releasing their leases), then close kernelfleet's HTTP clients."""
        self.kernel_manager.compliance.shutting_down = True
        loop = asyncio.get_event_loop()
        loop.run_until_complete(self.kernel_manager.warm.stop())  # no refill while stopping
        super().shutdown()
        loop.run_until_complete(self._close_clients())

    async def _close_clients(self) -> None:
        await self.kernel_manager.wait_for_releases()
        await self.kernel_manager.compliance.aclose()
        await self.scheduler.aclose()
        await self.identity_resolver.aclose()


def _read_secret(path: str, setting: str) -> str:
    """The stripped content of ``path`` ('' for no path); StartupError naming the setting."""
    if not path:
        return ""
    try:
        value = Path(path).read_text().strip()
    except OSError as e:
        raise StartupError(f"{setting}: cannot read {path}: {e.strerror}") from e
    if not value:
        raise StartupError(f"{setting}: {path} is empty")
    return value


def main(argv: list[str] | None = None) -> None:
    """Start the gateway (``python -m gateway.server``)."""
    KernelfleetGatewayApp.launch_instance(argv=argv)
