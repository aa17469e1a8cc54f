"""Names the command lines need before anything loads: kept free of torch and diffusers, so ``--help`` is quick."""

from __future__ import annotations

#: the model a user gets without ``--model``
DEFAULT_MODEL = "stabilityai/sd-turbo"
#: what ``--backend`` accepts: ``auto`` and every backend of :data:`engine.backends.BACKENDS`
BACKEND_CHOICES: tuple[str, ...] = ("auto", "torch", "compile", "trt")
#: what ``--cost`` accepts: how :mod:`engine.parallel.costs` finds what each UNet block costs
COST_KINDS: tuple[str, ...] = ("estimated", "measured")
#: what ``--scheduler`` accepts: every scheduler of :data:`engine.parallel.sampling.SCHEDULERS`
SCHEDULER_NAMES: tuple[str, ...] = ("ddim", "euler")
