"""Load a model by hub id, local diffusers folder, single ``.safetensors`` file, or preset name.

Everything is read as safetensors. Hub models resolve through the local Hugging Face cache
first; when a model is not there and the hub cannot be reached (or ``HF_HUB_OFFLINE=1``),
loading fails fast with :class:`ModelUnavailableError`, whose message says what to do.

A pipeline loaded in fp16 (the default on GPUs) reads the repository's fp16 variant where it has
one (``unet/diffusion_pytorch_model.fp16.safetensors`` and so on): half the download, 2.6 GB
instead of 5.2 GB for sd-turbo. Either set already on disk is used as it is.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from engine.components import Components
from engine.names import DEFAULT_MODEL
from engine.presets import build_preset, is_preset

log = logging.getLogger(__name__)

DEFAULT_TAESD = "madebyollin/taesd"
DEFAULT_LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"

# What a diffusers pipeline folder needs: its configs, the tokenizer, and one set of weights (see
# pipeline_weights), without the safety checker and the EMA/single-file duplicates some repositories carry.
_PIPELINE_CONFIGS = ["model_index.json", "*/*.json", "*/*.txt"]
_PIPELINE_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
FP16 = "fp16"
_WEIGHT_FILES = ["*.json", "*.safetensors"]
HUB_TIMEOUT_S = 15.0


class ModelUnavailableError(RuntimeError):
    """A model could not be found locally or fetched; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how.

    ``model``: a hub id, a local diffusers folder, a ``.safetensors`` file, or a preset (``tiny``,
    ``small``). ``vae``: ``tiny`` (TAESD, the fast default), ``full`` (the model's own VAE), or a hub
    id / folder of an ``AutoencoderTiny``. ``lcm_lora``: ``auto`` fuses LCM-LoRA into SD 1.x models
    that are not already few-step (turbo/LCM), ``none`` never does, anything else is the LoRA to fuse.
    """

    model: str = DEFAULT_MODEL
    vae: str = "tiny"
    lcm_lora: str = "auto"
    device: str | None = None
    dtype: str | None = None
    cache_dir: str | None = None

    def resolved_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} asked for, but this torch build sees no CUDA GPU")
        return device

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is None:
            return torch.float16 if device.type == "cuda" else torch.float32
        dtypes = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                  "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if self.dtype not in dtypes:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(dtypes)}")
        return dtypes[self.dtype]


LOAD_STAGES = ("pipeline", "lcm-lora", "vae", "device")


def load_components(spec: ModelSpec = ModelSpec(), progress: Callable[[str], None] | None = None) -> Components:
    """Load everything a stream needs, on the spec's device and dtype.

    ``progress``, if given, is called after each of :data:`LOAD_STAGES` (for a progress bar).
    """
    report = progress or (lambda stage: None)
    device = spec.resolved_device()
    dtype = spec.resolved_dtype(device)
    if is_preset(spec.model):
        components = build_preset(spec.model, vae=spec.vae, device=device, dtype=dtype)
        for stage in LOAD_STAGES:
            report(stage)
        return components
    pipe = _load_pipeline(spec, dtype)
    report("pipeline")
    _maybe_fuse_lcm_lora(pipe, spec)
    report("lcm-lora")
    vae = pipe.vae if spec.vae == "full" else _load_taesd(spec, dtype)
    report("vae")
    components = _components_from_pipeline(pipe, vae, spec.model, device, dtype)
    report("device")
    log.info("loaded %s (%s) on %s as %s", spec.model, components.family, device, dtype)
    return components


def _load_pipeline(spec: ModelSpec, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    path = Path(spec.model).expanduser()
    options = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if path.is_file():
        return _load_single_file(path, spec, options)
    if _looks_like_path(spec.model) and not path.is_dir():
        raise ModelUnavailableError(f"model path {spec.model!r} does not exist")
    folder = path if path.is_dir() else Path(resolve_pipeline_snapshot(spec.model, dtype, spec.cache_dir))
    try:
        variant = pipeline_variant(_files_in(folder), dtype, folder)
    except (LookupError, OSError, ValueError) as error:  # ValueError: a shard index that is not JSON
        raise ModelUnavailableError(f"model {spec.model!r}: {error}") from None
    return StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, variant=variant, **options)


def pipeline_weights(variant: str | None) -> list[str]:
    """The weight files of a diffusers SD pipeline, full precision (``None``) or its ``variant``, one per component
    (a component saved in shards has an index file instead: :func:`_weight_names`)."""
    return [single for _, single, _ in _weight_names(variant)]


def _weight_names(variant: str | None) -> list[tuple[str, str, str]]:
    """Per component of a weight set: its folder, its one weight file, and the index file it has instead when saved
    in shards (diffusers' and transformers' names alike)."""
    tag = f".{variant}" if variant else ""
    return [(folder, f"{folder}/{stem}{tag}.safetensors", f"{folder}/{stem}.safetensors.index{tag}.json")
            for folder, stem in _PIPELINE_WEIGHTS.items()]


def _weight_patterns(variant: str | None) -> list[str]:
    """What to download of one weight set: each component's file, or its index and shards (for a variant, in the
    older naming too: name-00001-of-00002.fp16.safetensors)."""
    tag = f".{variant}" if variant else ""
    patterns = []
    for (folder, stem), (_, single, index) in zip(_PIPELINE_WEIGHTS.items(), _weight_names(variant)):
        patterns += [single, index, f"{folder}/{stem}{tag}-*-of-*.safetensors"]
        if variant:
            patterns.append(f"{folder}/{stem}-*-of-*{tag}.safetensors")
    return patterns


def _has_weights(files: Collection[str], variant: str | None, folder: Path | None) -> bool:
    """Whether ``files`` hold every component of the set ``variant``; a sharded one's shards too where the
    ``folder`` is there to read its index from."""
    for component, single, index in _weight_names(variant):
        if single in files:
            continue
        if index not in files:
            return False
        if folder is not None:
            shards = set(json.loads((folder / index).read_text("utf-8")).get("weight_map", {}).values())
            if not all(f"{component}/{shard}" in files for shard in shards):
                return False
    return True


def pipeline_variant(files: Collection[str], dtype: torch.dtype, folder: Path | None = None) -> str | None:
    """Which weight set of a pipeline to read, of ``files`` (paths in its ``folder``, or in its repository): for fp16
    its fp16 variant (half the size), else the full-precision files; else whichever set is complete. ``LookupError``,
    saying what is missing, when neither is."""
    complete = [variant for variant in ((FP16, None) if dtype == torch.float16 else (None, FP16))
                if _has_weights(files, variant, folder)]
    if not complete:
        missing = [name for name in pipeline_weights(None) if name not in files]
        raise LookupError(f"no complete set of safetensors weights (missing {', '.join(missing)}, and no fp16 "
                          "variant of them); diffcam loads only safetensors diffusers pipelines")
    return complete[0]


def _files_in(folder: Path) -> set[str]:
    """The files under ``folder``, as paths relative to it; through symlinked folders too."""
    return {(Path(root) / name).relative_to(folder).as_posix()
            for root, _, names in os.walk(folder, followlinks=True) for name in names}


def _load_single_file(path: Path, spec: ModelSpec, options: dict):
    from diffusers import StableDiffusionPipeline

    if path.suffix != ".safetensors":
        raise ModelUnavailableError(
            f"model file {str(path)!r} is not a .safetensors file; diffcam loads only safetensors "
            "(pickled .ckpt/.bin files can run code when loaded)"
        )
    try:
        # The single-file loader fetches the matching diffusers config from the hub unless cached.
        return StableDiffusionPipeline.from_single_file(
            str(path), local_files_only=hub_offline(), cache_dir=spec.cache_dir, **options
        )
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(
            f"could not load {str(path)!r} as a single-file SD 1.x/2.x checkpoint: {_first_line(error)}. "
            "It needs the model's diffusers config from the hub once (run where there is network), "
            "or convert it to a diffusers folder and pass that folder."
        ) from error


def _load_taesd(spec: ModelSpec, dtype: torch.dtype):
    from diffusers import AutoencoderTiny

    source = DEFAULT_TAESD if spec.vae == "tiny" else spec.vae
    folder = source if Path(source).expanduser().is_dir() else resolve_hub_snapshot(
        source, _WEIGHT_FILES, spec.cache_dir)
    return AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)


def _maybe_fuse_lcm_lora(pipe, spec: ModelSpec) -> None:
    lora = spec.lcm_lora
    if lora == "none" or (lora == "auto" and not needs_lcm_lora(pipe, spec.model)):
        return
    source = DEFAULT_LCM_LORA if lora == "auto" else lora
    folder = source if Path(source).expanduser().exists() else resolve_hub_snapshot(
        source, _WEIGHT_FILES, spec.cache_dir)
    pipe.load_lora_weights(folder, adapter_name="lcm", use_safetensors=True)
    pipe.fuse_lora()
    log.info("fused LCM-LoRA %s into %s", source, spec.model)


def needs_lcm_lora(pipe, name: str) -> bool:
    """SD 1.x models need LCM-LoRA for few-step sampling unless already turbo/LCM-distilled."""
    is_sd1 = int(pipe.text_encoder.config.hidden_size) == 768
    distilled = pipe.unet.config.get("time_cond_proj_dim") is not None
    named_fast = any(tag in name.lower() for tag in ("turbo", "lcm", "lightning", "hyper"))
    return is_sd1 and not distilled and not named_fast


def _components_from_pipeline(pipe, vae, name: str, device: torch.device, dtype: torch.dtype) -> Components:
    from diffusers import LCMScheduler

    for module in (pipe.unet, vae, pipe.text_encoder):
        module.to(device=device, dtype=dtype)
    return Components(
        name=name,
        unet=pipe.unet,
        vae=vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=LCMScheduler.from_config(pipe.scheduler.config),
        device=device,
        dtype=dtype,
    )


def local_model(spec: ModelSpec, device: str | None = None) -> ModelSpec:
    """``spec`` with a hub id replaced by its snapshot folder in the local cache, fetched here if need be, in the
    precision it runs in on ``device`` (default: the spec's).

    For processes that each load the model (the ranks of a sharded stream): the model is
    downloaded once, and a missing one fails here with one :class:`ModelUnavailableError`
    instead of in every process.
    """
    if is_preset(spec.model) or _looks_like_path(spec.model) or Path(spec.model).expanduser().exists():
        return spec
    dtype = spec.resolved_dtype(torch.device(device) if device is not None else spec.resolved_device())
    return replace(spec, model=resolve_pipeline_snapshot(spec.model, dtype, spec.cache_dir))


def resolve_pipeline_snapshot(repo_id: str, dtype: torch.dtype, cache_dir: str | None = None) -> str:
    """A local folder holding a diffusers pipeline ``repo_id`` with a complete weight set: the one in the cache
    if there is one, else downloaded, in the set :func:`pipeline_variant` picks from the repository's files."""
    def usable(folder: str) -> bool:
        try:
            pipeline_variant(_files_in(Path(folder)), dtype, Path(folder))
        except (LookupError, OSError, ValueError):  # ValueError: an index that is not JSON
            return False
        return True

    def wanted(files: list[str]) -> list[str]:
        try:
            return _PIPELINE_CONFIGS + _weight_patterns(pipeline_variant(files, dtype))
        except LookupError as error:
            raise ModelUnavailableError(f"model {repo_id!r} on the Hugging Face hub has {error}") from None

    # the cache is asked for the configs only: huggingface_hub refuses a cached snapshot that lacks a file it knows
    # the repository has and the patterns match, and one weight set there is all it takes (usable() checks that)
    return resolve_hub_snapshot(repo_id, _PIPELINE_CONFIGS, cache_dir, usable=usable, wanted=wanted)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set now (huggingface_hub only reads it at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag in {"1", "true", "yes", "on"} or bool(constants.HF_HUB_OFFLINE)


def resolve_hub_snapshot(repo_id: str, patterns: list[str], cache_dir: str | None = None, *,
                         usable: Callable[[str], bool] = lambda folder: True,
                         wanted: Callable[[list[str]], list[str]] | None = None) -> str:
    """A local folder holding ``repo_id``'s files matching ``patterns``: from the cache (where ``usable`` says the
    folder there is), else downloaded, else a clear error. ``wanted``: the patterns to download, given the
    repository's files (default: ``patterns``)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir, local_files_only=True)
        if usable(folder):
            return folder
    except Exception:  # noqa: BLE001 - any cache miss means "try the hub"
        pass
    if hub_offline():
        raise ModelUnavailableError(_unavailable_message(repo_id, "HF_HUB_OFFLINE is set"))
    log.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        # huggingface_hub waits forever on a server that accepts but never answers: ask with a deadline first
        info = HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
        if wanted is not None:
            patterns = wanted([sibling.rfilename for sibling in info.siblings or ()])
        return snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir)
    except ModelUnavailableError:
        raise
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise ModelUnavailableError(
            f"model {repo_id!r} was not found on the Hugging Face hub or needs a login "
            f"({_first_line(error)}); check the id, run `hf auth login`, or pass a local path"
        ) from error
    except Exception as error:  # noqa: BLE001 - network failures come in many types
        raise ModelUnavailableError(_unavailable_message(repo_id, _first_line(error))) from error


def _unavailable_message(repo_id: str, reason: str) -> str:
    return (
        f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
        f"({reason}). Fix: on a machine with network run `hf download {repo_id}` (and copy the cache), "
        f"or pass a local diffusers folder or .safetensors file with --model PATH; "
        f"for an offline test model use --model tiny."
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".safetensors") or name.count("/") > 1 or "\\" in name


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
