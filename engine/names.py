"""Names the command lines need before anything loads: kept free of torch and diffusers, so ``--help`` is quick."""

from __future__ import annotations

#: the model a user gets without ``--model``
DEFAULT_MODEL = "stabilityai/sd-turbo"
#: what ``--backend`` accepts: ``auto`` and every backend of :data:`engine.backends.BACKENDS`
BACKEND_CHOICES: tuple[str, ...] = ("auto", "torch", "compile", "trt")
