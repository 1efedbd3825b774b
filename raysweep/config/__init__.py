"""The one typed run config: schema.py composes RunConfig from the sections its owners define and
from the registered plug-ins; io.py reads YAML, applies --set overrides and formats errors."""
from raysweep.config.io import (
                                absolute_paths,
                                apply_overrides,
                                checkpoint_config,
                                current_identity,
                                dump_config,
                                format_validation_error,
                                load_config,
                                parse_override,
                                read_yaml,
                                run_identity,
                                same_run,
                                set_path,
                                validate_config,
)
from raysweep.config.schema import RunBase, RunConfig, run_config_model

__all__ = ["RunBase", "RunConfig", "absolute_paths", "apply_overrides", "checkpoint_config", "current_identity",
           "dump_config", "format_validation_error", "load_config", "parse_override", "read_yaml", "run_config_model",
           "run_identity", "same_run", "set_path", "validate_config"]
