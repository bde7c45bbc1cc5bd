"""Secrets at rest: AES-256-GCM under a master keyring, and a value type that never prints."""

from fleetgate.sealing.keyring import Keyring, MasterKey
from fleetgate.sealing.seal import SealedBox, open_box, seal
from fleetgate.sealing.secret import Secret

__all__ = ["Keyring", "MasterKey", "SealedBox", "Secret", "open_box", "seal"]
