"""``python -m gateway.server --config <file.py>``: start KernelfleetGatewayApp."""

from gateway.server.app import main

if __name__ == "__main__":
    main()
