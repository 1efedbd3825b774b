"""The one typed run config (schema.py), validated at load, with YAML, --set overrides and paths."""
from raysweep.config.schema import *  # noqa: F401,F403
