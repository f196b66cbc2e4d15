"""The version of mechkit: its one source, which ``pyproject.toml`` reads when the wheel is built
and which sweeps record beside their results."""

__version__ = "0.1.0"
