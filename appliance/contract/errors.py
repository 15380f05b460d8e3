"""One exception family. Every message is one line that names the problem and what to do."""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance reports to a person.

    The CLI prints ``str(error)`` as a single line and exits non-zero; the TUI shows
    it as a notification with ``title``.
    """

    title = "Appliance error"
    exit_code = 1


class HomeError(ApplianceError):
    title = "Home directory"


class ConfigError(ApplianceError):
    title = "Configuration"


class BaseModelError(ApplianceError):
    title = "Base model"


class DataError(ApplianceError):
    title = "Data"


class TrainError(ApplianceError):
    title = "Training"


class ExportError(ApplianceError):
    title = "Export"


class ToolchainError(ApplianceError):
    title = "llama.cpp toolchain"


class ParityError(ExportError):
    title = "Parity check"


class RegistryError(ApplianceError):
    title = "Model registry"


class ServeError(ApplianceError):
    title = "Endpoint"


class AccessError(ApplianceError):
    """The caller's API key may not do this (role too low, collection not its own, key unknown or revoked)."""

    title = "Access"
    exit_code = 5
