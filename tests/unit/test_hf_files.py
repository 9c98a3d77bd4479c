"""The Hugging Face-compatible file endpoint (/hf; server/ops/hf_files.py, gateway/routes/hf_files.py)
in-process: which files a served base model's repo shows, the headers huggingface_hub reads, and
every refusal a 4xx JSON naming its field plus the X-Error-Code huggingface_hub maps to its own
exception. The real SDK and transformers load tokenizers through it in
tests/integration/test_hf_tokenizer.py."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from server.boot import build_runtime
from server.config import Settings
from server.errors import Forbidden, InvalidRequest, NotFound
from server.ops import hf_files
from tests.support.admin import ADMIN_KEY
from tests.support.http import local_client

ORG_MODEL = "test-org/chatty"  # a served base whose name has a slash, as hub ids do
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "model.gguf")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """tiny-qwen3, plus "test-org/chatty": its tokenizer and config next to weights, code and an
    extra chat template, as a materialised model folder (resolve_base_model finds it, nothing loads it)."""
    hf_dir = tmp_path_factory.mktemp("hf-files")
    (hf_dir / "models").mkdir()
    (hf_dir / "models" / "tiny-qwen3").symlink_to(tiny_model_dir)
    chatty = hf_dir / "models" / "test-org--chatty"
    chatty.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tiny_model_dir / name, chatty / name)
    for name in (*WEIGHTS, "modeling_chatty.py", "README.md"):
        (chatty / name).write_bytes(b"not for clients")
    (chatty / hf_files.TEMPLATES_DIR).mkdir()
    (chatty / hf_files.TEMPLATES_DIR / "tool_use.jinja").write_text("{{ messages }}")
    (chatty / hf_files.TEMPLATES_DIR / "notes.txt").write_text("not a template")
    (chatty / ".twinkle-complete").write_text(json.dumps({"source": "test", "fingerprint": None}))
    return hf_dir


def app_client(hf_dir: Path, **settings: object) -> TestClient:
    # No lifespan (no `with`): these routes need the served names and the data dir, not a started engine.
    runtime = build_runtime(Settings(data_dir=hf_dir, base_model=["tiny-qwen3", ORG_MODEL], torch_threads=1,
                                     **settings))
    return local_client(create_app(runtime))


@pytest.fixture(scope="module")
def client(hf_dir: Path) -> Iterator[TestClient]:
    yield app_client(hf_dir)


@pytest.fixture(scope="module")
def snap(hf_dir: Path) -> hf_files.Snapshot:
    return hf_files._snapshot(ORG_MODEL, hf_dir / "models" / "test-org--chatty")


def hub_error(response, status: int, field: str, code: str | None) -> dict:
    """A user-category JSON error naming `field`, with huggingface_hub's X-Error-Code (none: no code)."""
    assert response.status_code == status, response.text
    assert response.headers.get("x-error-code") == code
    if response.request.method == "HEAD":  # no body: huggingface_hub reads the headers
        return {}
    body = response.json()
    assert body["category"] == "user" and body["field"] == field and body["error"], body
    assert "Traceback" not in response.text
    return body


# ----- the selection: what a repo shows ----------------------------------------------------------
def test_a_repo_shows_only_tokenizer_and_config_files(snap: hf_files.Snapshot) -> None:
    assert list(snap.files) == ["additional_chat_templates/tool_use.jinja", "chat_template.jinja", "config.json",
                                "tokenizer.json", "tokenizer_config.json"]
    file = snap.files["tokenizer.json"]
    data = file.disk.read_bytes()
    assert file.size == len(data) and file.sha256 == hashlib.sha256(data).hexdigest()
    assert file.blob_id == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


def test_the_commit_is_40_hex_stable_and_follows_the_files(hf_dir: Path, snap: hf_files.Snapshot,
                                                           tmp_path: Path) -> None:
    assert re.fullmatch("[0-9a-f]{40}", snap.commit)
    assert hf_files._snapshot(ORG_MODEL, hf_dir / "models" / "test-org--chatty").commit == snap.commit
    folder = tmp_path / "models" / "other"
    shutil.copytree(snap.files["config.json"].disk.parent, folder, symlinks=True)
    first = hf_files._snapshot("other", folder).commit
    assert first == snap.commit  # the same files make the same commit
    (folder / "config.json").write_text("{}")
    assert hf_files._snapshot("other", folder).commit != first


@pytest.mark.parametrize("path", ["tokenizer.json", "merges.txt", "vocab.json", "tokenizer.model", "o200k.tiktoken",
                                  "additional_chat_templates/tool_use.jinja", "generation_config.json"])
def test_allowed(path: str) -> None:
    assert hf_files.allowed(path)


@pytest.mark.parametrize("path", [*WEIGHTS, "modeling_chatty.py", "README.md", "additional_chat_templates/x.txt",
                                  "additional_chat_templates/../config.json", "sub/tokenizer.json", ".git/config"])
def test_not_allowed(path: str) -> None:
    assert not hf_files.allowed(path)


@pytest.mark.parametrize("path", ["../config.json", "a/../../x", "/etc/passwd", "./config.json", "a//b", "",
                                  "..\\config.json", "config.json\x00", "a/.."])
def test_a_path_must_stay_inside_the_repo(path: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        hf_files.check_relative(path, "filename")
    assert refused.value.field == "filename"


def test_weights_are_forbidden_and_other_files_absent(snap: hf_files.Snapshot) -> None:
    for name in WEIGHTS:
        with pytest.raises(Forbidden, match="never weights"):
            hf_files.file_of(snap, name)
    with pytest.raises(NotFound, match="only tokenizer and config files") as absent:
        hf_files.file_of(snap, "modeling_chatty.py")
    assert absent.value.field == "filename"
    with pytest.raises(NotFound, match="not in this repository"):
        hf_files.file_of(snap, "vocab.json")


def test_tree_lists_files_and_folders(snap: hf_files.Snapshot) -> None:
    top = hf_files.tree(snap, "", recursive=False)
    assert [e["path"] for e in top] == ["chat_template.jinja", "config.json", "tokenizer.json", "tokenizer_config.json",
                                        "additional_chat_templates"]
    assert top[-1]["type"] == "directory" and all(e["type"] == "file" for e in top[:-1])
    everything = hf_files.tree(snap, "", recursive=True)
    assert {e["path"] for e in everything} == {*snap.files, "additional_chat_templates"}
    inside = hf_files.tree(snap, "additional_chat_templates", recursive=False)
    assert [e["path"] for e in inside] == ["additional_chat_templates/tool_use.jinja"]
    with pytest.raises(NotFound) as missing:
        hf_files.tree(snap, "weights", recursive=False)
    assert missing.value.field == "path"


# ----- the routes ----------------------------------------------------------------------------------
def test_head_and_get_answer_what_hf_hub_download_reads(client: TestClient, snap: hf_files.Snapshot) -> None:
    file = snap.files["tokenizer.json"]
    url = f"/hf/{ORG_MODEL}/resolve/main/tokenizer.json"
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["x-repo-commit"] == snap.commit
    assert head.headers["etag"] == f'"{file.sha256}"' and int(head.headers["content-length"]) == file.size
    assert "x-xet-hash" not in head.headers  # nothing that would send huggingface_hub to Xet storage
    got = client.get(f"/hf/{ORG_MODEL}/resolve/{snap.commit}/tokenizer.json")  # main, or its commit
    assert got.status_code == 200 and got.content == file.disk.read_bytes()
    assert got.headers["x-repo-commit"] == snap.commit
    ranged = client.get(url, headers={"Range": "bytes=0-9"})  # a resumed download
    assert ranged.status_code == 206 and ranged.content == file.disk.read_bytes()[:10]
    template = client.get(f"/hf/{ORG_MODEL}/resolve/main/additional_chat_templates/tool_use.jinja")
    assert template.status_code == 200 and template.text == "{{ messages }}"


def test_model_info_and_tree_routes(client: TestClient, snap: hf_files.Snapshot) -> None:
    info = client.get(f"/hf/api/models/{ORG_MODEL}").json()
    assert info["id"] == ORG_MODEL and info["sha"] == snap.commit and info["private"] is False
    assert [s["rfilename"] for s in info["siblings"]] == list(snap.files)
    assert client.get(f"/hf/api/models/{ORG_MODEL}/revision/main").json() == info
    assert client.get(f"/hf/api/models/{ORG_MODEL}/revision/{snap.commit}").json() == info
    listed = client.get(f"/hf/api/models/{ORG_MODEL}/tree/main", params={"recursive": "true", "expand": "false"})
    assert {e["path"] for e in listed.json() if e["type"] == "file"} == set(snap.files)
    folder = client.get(f"/hf/api/models/{ORG_MODEL}/tree/main/additional_chat_templates")
    assert [e["path"] for e in folder.json()] == ["additional_chat_templates/tool_use.jinja"]
    tiny = client.get("/hf/api/models/tiny-qwen3/tree/main").json()
    assert {e["path"] for e in tiny} == {"chat_template.jinja", "config.json", "generation_config.json",
                                         "tokenizer.json", "tokenizer_config.json"}


def test_an_unknown_repo_is_repo_not_found(client: TestClient) -> None:
    for url in ("/hf/Qwen/Qwen3-8B/resolve/main/config.json", "/hf/api/models/Qwen/Qwen3-8B",
                "/hf/api/models/nope/tree/main", "/hf/tiny-qwen3x/resolve/main/config.json",
                "/hf/models/tiny-qwen3/resolve/main/config.json"):
        body = hub_error(client.get(url), 404, "repo_id", "RepoNotFound")
        assert "tiny-qwen3" in body["error"]  # says what is served
    hub_error(client.head("/hf/nope/resolve/main/config.json"), 404, "repo_id", "RepoNotFound")


def test_a_base_served_from_a_folder_path_is_no_repo(hf_dir: Path, tiny_model_dir: Path) -> None:
    folder = str(tiny_model_dir.resolve())
    runtime = build_runtime(Settings(data_dir=hf_dir, base_model=["tiny-qwen3", folder], torch_threads=1))
    client = local_client(create_app(runtime))
    body = hub_error(client.get(f"/hf/{folder}/resolve/main/config.json"), 404, "repo_id", "RepoNotFound")
    assert body["error"].count(folder) == 1 and "serves 'tiny-qwen3' (" in body["error"]  # only as the input
    assert folder not in client.get("/hf/nope/resolve/main/config.json").json()["error"]


def test_a_bad_revision_is_revision_not_found(client: TestClient) -> None:
    for revision in ("dev", "0" * 40, "v1.0"):
        hub_error(client.get(f"/hf/tiny-qwen3/resolve/{revision}/config.json"), 404, "revision", "RevisionNotFound")
    hub_error(client.get("/hf/api/models/tiny-qwen3/revision/dev"), 404, "revision", "RevisionNotFound")
    hub_error(client.get("/hf/api/models/tiny-qwen3/tree/dev"), 404, "revision", "RevisionNotFound")


def test_weights_are_refused_with_a_403(client: TestClient, snap: hf_files.Snapshot) -> None:
    for name in WEIGHTS:
        for method in ("GET", "HEAD"):
            answer = client.request(method, f"/hf/{ORG_MODEL}/resolve/main/{name}")
            # EntryNotFound: huggingface_hub raises EntryNotFoundError, not "check your connection"
            hub_error(answer, 403, "filename", "EntryNotFound")
            assert "never weights" in answer.headers["x-error-message"]
            assert answer.headers["x-repo-commit"] == snap.commit
        assert "never weights" in client.get(f"/hf/{ORG_MODEL}/resolve/main/{name}").json()["error"]
    hub_error(client.get("/hf/tiny-qwen3/resolve/main/model.safetensors"), 403, "filename", "EntryNotFound")


def test_files_not_served_are_entry_not_found(client: TestClient, snap: hf_files.Snapshot) -> None:
    for name in ("modeling_chatty.py", "README.md", "additional_chat_templates/notes.txt", "vocab.json"):
        answer = client.get(f"/hf/{ORG_MODEL}/resolve/main/{name}")
        hub_error(answer, 404, "filename", "EntryNotFound")
        assert answer.headers["x-repo-commit"] == snap.commit  # so the client caches "not there"
    hub_error(client.get("/hf/api/models/tiny-qwen3/tree/main/additional_chat_templates"), 404, "path", "EntryNotFound")


@pytest.mark.parametrize("tail", ["%2e%2e/%2e%2e/etc/passwd", "..%2Fconfig.json", "%2e%2e%2fconfig.json",
                                  "/etc/passwd", "%2Fetc%2Fpasswd", "a/%2e%2e/config.json", "..%5Cconfig.json",
                                  "config.json%00", "a%09b"])
def test_a_path_out_of_the_repo_is_a_400(client: TestClient, tail: str) -> None:
    answer = client.get(f"/hf/{ORG_MODEL}/resolve/main/{tail}")
    body = hub_error(answer, 400, "filename", None)
    assert "relative path inside the repository" in body["error"]
    hub_error(client.get(f"/hf/api/models/{ORG_MODEL}/tree/main/{tail}"), 400, "path", None)


def test_odd_urls_never_reach_a_file(client: TestClient) -> None:
    # '..' as written (the client may normalise it away), and a line break, which no route matches.
    for tail in ("../../../../etc/passwd", "%0d%0aX-Injected:%201"):
        answer = client.get(f"/hf/{ORG_MODEL}/resolve/main/{tail}")
        assert answer.status_code in (400, 404) and "root:" not in answer.text and "x-injected" not in answer.headers
        assert answer.headers["content-type"].startswith("application/json")


def test_open_without_a_key_even_when_keys_are_required(hf_dir: Path) -> None:
    """The endpoint serves no tenant's data: HF clients send no Twinkle key, and none is asked for."""
    keyed = app_client(hf_dir, auth="keys", admin_key=ADMIN_KEY)
    assert keyed.get("/api/v1/get_server_capabilities").status_code == 401  # the API itself wants a key
    assert keyed.get("/hf/tiny-qwen3/resolve/main/tokenizer_config.json").status_code == 200
    assert keyed.get("/hf/api/models/tiny-qwen3").status_code == 200


def test_only_get_and_head(client: TestClient) -> None:
    answer = client.post("/hf/tiny-qwen3/resolve/main/config.json", content=b"x")
    assert answer.status_code == 405 and answer.headers["content-type"].startswith("application/json")
