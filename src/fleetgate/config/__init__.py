"""Configuration: one TOML file plus ``FLEETGATE_*__*`` overrides, parsed once, frozen."""

from fleetgate.config.load import load_config, parse_config
from fleetgate.config.schema import Config

__all__ = ["Config", "load_config", "parse_config"]
