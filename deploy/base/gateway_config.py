"""Enterprise Gateway with gateway.server on Kubernetes (from the kernelfleet-config ConfigMap).

Tokens come from the kernelfleet-tokens Secret, mounted at /etc/kernelfleet/secrets.
"""

c = get_config()  # type: ignore[name-defined]  # noqa: F821 - provided by traitlets

c.KernelfleetGatewayApp.ip = "0.0.0.0"
c.KernelfleetGatewayApp.port = 8888
c.KernelfleetGatewayApp.hub_api_url = "http://hub.jhub.svc.cluster.local:8081/hub/api"
c.KernelfleetGatewayApp.scheduler_url = "http://scheduler.kernelfleet.svc.cluster.local:8300"
c.KernelfleetGatewayApp.scheduler_token_file = "/etc/kernelfleet/secrets/scheduler_token"
c.KernelfleetGatewayApp.admin_token_file = "/etc/kernelfleet/secrets/gateway_service_token"
# gateway.server creates <root>/<user> before a start; kernel pods have their own home.
c.KernelfleetGatewayApp.kernel_home_root = "/var/lib/kernelfleet/home"
