"""Keep command-line output to what the user needs: our progress and results, not library chatter."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    """Silence transformers/diffusers info and advisory warnings (errors still show)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("httpx").setLevel(logging.WARNING)
