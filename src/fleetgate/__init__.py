"""fleetgate: a self-hosted secure connectivity gateway for IoT fleets."""

__version__ = "0.1.0"
