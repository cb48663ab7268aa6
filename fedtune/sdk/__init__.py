"""The embedded API: fedtune inside an application (see docs/sdk.md).

``Client`` joins a federation (or trains alone) on data the application holds;
``load_adapter`` / ``export_adapter`` use the result; ``Server`` starts a server process.
Errors an application should expect, all raised before anything connects where they can
be: ``DataError`` (data), ``ProfileError`` (device profile), ``IncompatibleModelError``
(a model that is not the federation's base), ``ModelNotFoundError``, ``ConfigError`` (a
scenario), ``FederationError`` (cannot join or stay), ``AdapterNotFoundError``.
"""

from fedtune.config import ConfigError
from fedtune.data.types import DataError
from fedtune.model.compat import IncompatibleModelError
from fedtune.model.loading import ModelNotFoundError
from fedtune.planning.profiles import DeviceProfile, ProfileError
from fedtune.sdk.client import (
    Client,
    FederationError,
    FederationResult,
    Progress,
    RoundReport,
    Session,
)
from fedtune.sdk.local import LocalResult
from fedtune.sdk.results import (
    AdapterNotFoundError,
    adapter_dir,
    base_of,
    export_adapter,
    load_adapter,
    load_model,
)
from fedtune.sdk.server import Server

__all__ = [
    "AdapterNotFoundError", "Client", "ConfigError", "DataError", "DeviceProfile",
    "FederationError", "FederationResult", "IncompatibleModelError", "LocalResult",
    "ModelNotFoundError", "ProfileError", "Progress", "RoundReport", "Server", "Session",
    "adapter_dir", "base_of", "export_adapter", "load_adapter", "load_model",
]
