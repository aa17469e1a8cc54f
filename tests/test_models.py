"""Model loading: presets are deterministic and offline; hub models fail fast and clearly offline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.models import (FP16, ModelSpec, ModelUnavailableError, load_components, local_model, pipeline_variant,
                           pipeline_weights)
from engine.presets import build_preset, load_tiny_tokenizer
from engine.tokenizer_vocab import TINY_TOKENIZER_DIR, byte_level_vocab, bytes_to_unicode


def test_presets_are_deterministic_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(1234)
    before = torch.rand(1)
    torch.manual_seed(1234)
    a, b = build_preset("tiny"), build_preset("tiny")
    assert torch.equal(torch.rand(1), before)
    for module in ("unet", "vae", "text_encoder"):
        pairs = zip(getattr(a, module).state_dict().values(), getattr(b, module).state_dict().values())
        assert all(torch.equal(x, y) for x, y in pairs), module


def test_small_preset_is_sd_shaped_with_both_vaes() -> None:
    small = build_preset("small")
    params = sum(p.numel() for p in small.unet.parameters())
    assert 10e6 <= params <= 20e6
    assert len(small.unet.config.block_out_channels) == 4
    assert type(small.vae).__name__ == "AutoencoderTiny"
    assert type(build_preset("small", vae="full").vae).__name__ == "AutoencoderKL"


def test_sd_turbo_random_has_sd_turbos_architecture() -> None:
    """Built on the meta device: the shapes without 3.5 GB of random weights. The counts are sd-turbo's
    own (UNet 865,910,724; TAESD 2,445,063 as diffusers' default AutoencoderTiny; SD's VAE 83,653,863)."""
    from diffusers import AutoencoderTiny

    from engine.presets import PRESETS, _unet, _vae

    spec = PRESETS["sd-turbo-random"]
    with torch.device("meta"):
        unet, taesd, kl, reference_taesd = _unet(spec), _vae(spec, "tiny", "x"), _vae(spec, "full", "x"), AutoencoderTiny()
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (count(unet), count(taesd), count(kl)) == (865_910_724, 2_445_063, 83_653_863)
    assert taesd.config.num_encoder_blocks == reference_taesd.config.num_encoder_blocks
    assert unet.config.cross_attention_dim == 1024 and unet.config.use_linear_projection


def test_tiny_preset_has_no_full_vae() -> None:
    with pytest.raises(ValueError, match=r"vae='full' is not available for preset 'tiny'"):
        build_preset("tiny", vae="full")


def test_shipped_vocabulary_covers_every_byte() -> None:
    shipped = json.loads((TINY_TOKENIZER_DIR / "vocab.json").read_text("utf-8"))
    assert shipped == byte_level_vocab()
    assert all(char in shipped and char + "</w>" in shipped for char in bytes_to_unicode().values())


def test_tokenizer_gives_different_ids_for_different_prompts() -> None:
    tokenizer = load_tiny_tokenizer()
    ids = [tokenizer(p).input_ids for p in ("a cat", "a cot", "Ünïcødé ✓ 😀", "a cat")]
    assert ids[0] != ids[1] and ids[0] == ids[3]
    assert tokenizer.unk_token_id not in ids[2][1:-1], "every byte has a token"
    assert tokenizer.model_max_length == 77


def test_offline_hub_model_fails_fast_with_what_to_do(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as raised:
        load_components(ModelSpec(model="stabilityai/sd-turbo", cache_dir=str(tmp_path)))
    message = str(raised.value)
    assert "'stabilityai/sd-turbo'" in message
    assert "--model PATH" in message and "--model tiny" in message and "hf download" in message
    assert "\n" not in message, "one clear line, not a wall"


def test_unreachable_hub_fails_fast_with_what_to_do(monkeypatch, tmp_path) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed loopback port
    with pytest.raises(ModelUnavailableError, match="'someone/some-model' is not in the local Hugging Face cache"):
        load_components(ModelSpec(model="someone/some-model", cache_dir=str(tmp_path)))


def test_missing_path_and_pickle_files_are_refused(tmp_path) -> None:
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        load_components(ModelSpec(model=str(tmp_path / "nope.safetensors")))
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not really")
    with pytest.raises(ModelUnavailableError, match="not a .safetensors file"):
        load_components(ModelSpec(model=str(checkpoint)))


def test_bad_device_and_dtype() -> None:
    with pytest.raises(ValueError, match="dtype='float8'"):
        load_components(ModelSpec(model="tiny", dtype="float8"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            load_components(ModelSpec(model="tiny", device="cuda"))


def test_local_diffusers_folder_loads_the_same_model(tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    small = build_preset("small", vae="full")
    pipe = StableDiffusionPipeline(vae=small.vae, text_encoder=small.text_encoder, tokenizer=small.tokenizer,
                                   unet=small.unet, scheduler=small.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "model", safe_serialization=True)
    build_preset("tiny").vae.save_pretrained(tmp_path / "taesd", safe_serialization=True)
    assert not list(tmp_path.rglob("*.bin")), "safetensors only"

    loaded = load_components(ModelSpec(model=str(tmp_path / "model"), vae="full", device="cpu"))
    for name in ("unet", "vae", "text_encoder"):
        pairs = zip(getattr(small, name).state_dict().values(), getattr(loaded, name).state_dict().values())
        assert all(torch.equal(x, y) for x, y in pairs), name
    assert type(loaded.scheduler).__name__ == "LCMScheduler"
    custom_vae = load_components(ModelSpec(model=str(tmp_path / "model"), vae=str(tmp_path / "taesd")))
    assert type(custom_vae.vae).__name__ == "AutoencoderTiny"


def test_a_hub_that_never_answers_times_out_with_the_same_clear_error(monkeypatch, tmp_path) -> None:
    import socket

    import engine.models
    from huggingface_hub import constants

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never says a word
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(engine.models, "HUB_TIMEOUT_S", 1.0)
        with pytest.raises(ModelUnavailableError, match="could not be downloaded"):
            load_components(ModelSpec(model="someone/slow-model", cache_dir=str(tmp_path)))
    finally:
        silent.close()


#: the files of stabilityai/sd-turbo on the hub: both weight sets, and a single-file checkpoint besides
SD_TURBO_FILES = [".gitattributes", "README.md", "model_index.json", "sd_turbo.safetensors",
                  "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
                  "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
                  "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
                  "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
                  "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                  "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors"]


def test_fp16_reads_the_fp16_variant_and_other_dtypes_the_full_weights() -> None:
    from huggingface_hub.utils import filter_repo_objects

    from engine.models import _PIPELINE_CONFIGS, _weight_patterns

    assert pipeline_variant(SD_TURBO_FILES, torch.float16) == FP16
    assert pipeline_variant(SD_TURBO_FILES, torch.float32) is None
    assert pipeline_variant(SD_TURBO_FILES, torch.bfloat16) is None
    # what is downloaded for fp16: the configs, the tokenizer and the fp16 weights, nothing else
    fetched = set(filter_repo_objects(SD_TURBO_FILES, allow_patterns=_PIPELINE_CONFIGS + _weight_patterns(FP16)))
    assert {name for name in fetched if name.endswith(".safetensors")} == set(pipeline_weights(FP16))
    assert "tokenizer/vocab.json" in fetched and "model_index.json" in fetched
    # only one set there: that one, whatever the dtype; neither: a clear error
    full_only = [name for name in SD_TURBO_FILES if ".fp16." not in name]
    assert pipeline_variant(full_only, torch.float16) is None
    fp16_only = [name for name in SD_TURBO_FILES if name not in pipeline_weights(None)]
    assert pipeline_variant(fp16_only, torch.float32) == FP16
    with pytest.raises(LookupError, match="missing unet/diffusion_pytorch_model.safetensors, .*only safetensors"):
        pipeline_variant([name for name in full_only if not name.startswith("unet/diffusion")], torch.float16)
    # a UNet saved in shards: its index and every shard are fetched
    sharded = [name for name in full_only if not name.startswith("unet/diffusion")] + [
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors"]
    assert pipeline_variant(sharded, torch.float16) is None
    fetched = set(filter_repo_objects(sharded, allow_patterns=_PIPELINE_CONFIGS + _weight_patterns(None)))
    assert {name for name in sharded if name.startswith("unet/")} <= fetched and "sd_turbo.safetensors" not in fetched


def _saved_pipeline(components, folder, variant=None) -> None:
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                            unet=components.unet, scheduler=components.scheduler, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(folder, safe_serialization=True, variant=variant)


def _same_weights(expected, loaded) -> bool:
    return all(torch.equal(x.to(y.dtype), y) for x, y in zip(expected.unet.state_dict().values(),
                                                             loaded.unet.state_dict().values()))


def test_a_folder_and_a_cached_hub_model_load_the_weight_set_their_dtype_wants(tmp_path, monkeypatch) -> None:
    # the fp16 files hold another model here, so that which set was read shows in the weights
    full, other = build_preset("small", vae="full"), build_preset("small", vae="full")
    with torch.no_grad():
        for weight in other.unet.parameters():
            weight.add_(0.25)
    folder = tmp_path / "model"
    _saved_pipeline(full, folder)
    _saved_pipeline(other, folder, variant=FP16)
    assert all((folder / name).exists() for name in pipeline_weights(None) + pipeline_weights(FP16))
    as_fp16 = load_components(ModelSpec(model=str(folder), vae="full", device="cpu", dtype="float16"))
    assert as_fp16.unet.dtype == torch.float16 and _same_weights(other, as_fp16)
    assert _same_weights(full, load_components(ModelSpec(model=str(folder), vae="full", device="cpu")))
    linked = tmp_path / "linked"  # a folder put together from symlinked component folders
    linked.mkdir()
    for part in folder.iterdir():
        (linked / part.name).symlink_to(part)
    assert _same_weights(full, load_components(ModelSpec(model=str(linked), vae="full", device="cpu")))

    # a hub model in the cache, as a download of its fp16 set leaves it: with huggingface_hub's listing of every
    # file the repository has (the full set too), which makes it refuse a cached snapshot lacking one it is asked
    # for; offline, the fp16 set alone serves fp32 as well
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    repo, commit = tmp_path / "hub" / "models--someone--small-pipe", "0" * 40
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot, ignore=lambda _, names: [n for n in names if n in (
        "diffusion_pytorch_model.safetensors", "model.safetensors")])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    listed = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    write_tree_cache(str(repo), commit, {name: TreeCacheEntry(size=1, blob_id="0" * 40) for name in listed})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(model="someone/small-pipe", vae="full", device="cpu", cache_dir=str(tmp_path / "hub"))
    assert _same_weights(other, load_components(spec))
    assert local_model(spec, "cpu").model == str(snapshot)
    # a cached snapshot without a complete weight set is not the model: offline, that is the clear error
    for name in pipeline_weights(FP16):
        (snapshot / name).unlink()
    with pytest.raises(ModelUnavailableError, match="'someone/small-pipe' is not in the local Hugging Face cache"):
        load_components(spec)


def test_a_folder_with_a_unet_saved_in_shards_loads_and_one_missing_shard_is_named(tmp_path) -> None:
    small = build_preset("small", vae="full")
    folder = tmp_path / "model"
    _saved_pipeline(small, folder)
    small.unet.save_pretrained(folder / "unet", safe_serialization=True, max_shard_size="2MB")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shards = sorted((folder / "unet").glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1 and (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert _same_weights(small, load_components(ModelSpec(model=str(folder), vae="full", device="cpu")))
    shards[-1].unlink()
    with pytest.raises(ModelUnavailableError, match="no complete set of safetensors weights"):
        load_components(ModelSpec(model=str(folder), vae="full", device="cpu"))
