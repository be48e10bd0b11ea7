"""`lowbit ...`: a thin command line over the API (``lowbit --help``)."""

from lowbit.cli.commands import build_parser, main
from lowbit.cli.inputs import (
    UsageError,
    check_output_path,
    import_object,
    load_state_dict_file,
    os_error_message,
)

__all__ = [
    "main",
    "build_parser",
    "import_object",
    "load_state_dict_file",
    "os_error_message",
    "check_output_path",
    "UsageError",
]
