"""Tokenizers without the hub: with `HF_ENDPOINT=<server>/hf` (docs/hf-files.md), the unmodified
SDK's `training_client.get_tokenizer()` and `AutoTokenizer.from_pretrained(<base model>)` work on a
client that cannot reach huggingface.co, and give the tokenizer of the model's own folder; weights
cannot be downloaded that way.

The client runs in a subprocess, so that its environment is clean: a fresh empty HF_HOME, no
HF_HUB_OFFLINE, and every proxy pointing at a local recorder that answers nothing, so any request
meant for the hub fails and is recorded (NO_PROXY lets loopback through, to the server). The child
also makes one hub request on purpose, to prove the recorder would see one.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.process import ServerProcess, running_server
from tests.support.data import TEXTS
from workers.base_models import DEFAULT_BASE_MODEL

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, wörld! 你好"},
        {"role": "assistant", "content": "Hi."}]
PROBE = "CONNECT huggingface.co:443"  # the one hub request the child makes on purpose


def describe(tokenizer: Any) -> dict[str, Any]:
    """What must be equal between two loads of one tokenizer (runs in the child too: its source is sent)."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items())
    return {
        "encodings": [tokenizer.encode(text) for text in TEXTS + [CHAT[1]["content"]]],
        "chat": tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        "vocab": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(), "size": len(tokenizer),
        "special": sorted(tokenizer.all_special_tokens), "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
    }


CHILD = '''
import json, os, sys
from pathlib import Path
base_url, base = sys.argv[1], sys.argv[2]
TEXTS, CHAT = json.loads(sys.argv[3]), json.loads(sys.argv[4])
out = {}

import tinker
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from transformers import AutoTokenizer

with tinker.ServiceClient(base_url=base_url, api_key="tml-hf-tokenizer") as service:
    training = service.create_lora_training_client(base, rank=4, seed=0).result()
    out["tokenizer_id"] = training.get_info().model_data.tokenizer_id
    out["sdk"] = describe(training.get_tokenizer())
out["direct"] = describe(AutoTokenizer.from_pretrained(base))

try:  # weights: refused
    hf_hub_download(base, "model.safetensors")
    out["weights"] = "downloaded"
except HfHubHTTPError as exc:
    out["weights"] = [exc.response.status_code, str(exc)]
try:  # a file the repo does not have: the error transformers skips optional files on
    hf_hub_download(base, "no-such-file.json")
except EntryNotFoundError as exc:
    out["missing"] = type(exc).__name__
snapshot = Path(snapshot_download(base))  # everything the repo shows: tokenizer and config only
out["snapshot"] = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
home = Path(os.environ["HF_HOME"])
out["cached"] = sorted([str(p.relative_to(home)), p.stat().st_size] for p in home.rglob("*") if p.is_file())

try:  # the probe: the one request meant for the hub, through the proxy, which answers nothing
    HfApi(endpoint="https://huggingface.co").model_info("gpt2")
    out["probe"] = "reached the hub"
except Exception as exc:
    out["probe"] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(out))
'''


class ProxyRecorder:
    """A proxy that answers nothing: it records the first line of each request and hangs up."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.requests: list[str] = []
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self.requests.append(conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace"))
                except OSError:
                    self.requests.append("(nothing read)")

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy() -> Iterator[ProxyRecorder]:
    recorder = ProxyRecorder()
    yield recorder
    recorder.close()


def load_through_server(server: ServerProcess, base: str, proxy: ProxyRecorder, hf_home: Path) -> dict[str, Any]:
    """Run CHILD against the server's /hf, as a client with no hub; returns what it reports."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE_")) and "PROXY" not in k.upper()}
    env.update(HF_ENDPOINT=f"{server.base_url}/hf", HF_HOME=str(hf_home), HTTPS_PROXY=proxy.url,
               HTTP_PROXY=proxy.url, ALL_PROXY=proxy.url, https_proxy=proxy.url, http_proxy=proxy.url,
               all_proxy=proxy.url, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    code = "from __future__ import annotations\nimport json\n" + inspect.getsource(describe) + CHILD
    done = subprocess.run([sys.executable, "-c", code, server.base_url, base, json.dumps(TEXTS), json.dumps(CHAT)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def check(report: dict[str, Any], base: str, folder: Path, proxy: ProxyRecorder) -> None:
    from transformers import AutoTokenizer

    local = describe(AutoTokenizer.from_pretrained(str(folder)))  # what `twinkle model-path` points at
    assert report["tokenizer_id"] == base
    assert report["sdk"] == local
    assert report["direct"] == local
    status, message = report["weights"]
    assert status == 403 and "never weights" in message
    assert report["missing"] == "RemoteEntryNotFoundError"
    assert "config.json" in report["snapshot"] and "tokenizer_config.json" in report["snapshot"]
    served = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json"}
    assert set(report["snapshot"]) <= served, report["snapshot"]
    # The only trace of the weights: huggingface_hub's empty marker that the file is not there.
    weights = [(path, size) for path, size in report["cached"] if path.endswith((".safetensors", ".bin", ".gguf"))]
    assert weights and all("/.no_exist/" in path and size == 0 for path, size in weights), weights
    # The probe reached the recorder (so a request for the hub would have), and nothing else did.
    assert report["probe"] != "reached the hub", report["probe"]
    assert [line.split(" HTTP/")[0] for line in proxy.requests] == [PROBE], (proxy.requests, report["probe"])


def test_tiny_qwen3_tokenizer_from_the_server(server: ServerProcess, tiny_model_dir: Path, proxy: ProxyRecorder,
                                              tmp_path: Path) -> None:
    report = load_through_server(server, "tiny-qwen3", proxy, tmp_path / "hf-home")
    check(report, "tiny-qwen3", tiny_model_dir, proxy)


def test_smollm2_tokenizer_from_the_server(smollm2: tuple[Path, Path, list[str], Path], proxy: ProxyRecorder,
                                           tmp_path: Path) -> None:
    data_dir, folder, _, hf_home = smollm2
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TWINKLE_TORCH_THREADS": "1"}
    with running_server(data_dir, base_model=DEFAULT_BASE_MODEL, env=env, log_name="hf-tokenizer-server.log") as server:
        report = load_through_server(server, DEFAULT_BASE_MODEL, proxy, tmp_path / "hf-home")
    check(report, DEFAULT_BASE_MODEL, folder, proxy)
