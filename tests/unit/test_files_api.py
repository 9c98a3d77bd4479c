"""OpenAI's Files API (/v1/files and /api/v1/files) over HTTP: the official `openai` client uploads,
lists, reads and deletes; every bad upload is a 4xx naming its field, leaving nothing behind;
tenants see only their own files; expired files vanish and the reaper removes them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from server.boot import build_runtime
from server.config import Settings
from server.ops import files
from server.ops.reaper import reap_expired
from server.store.tables import UploadedFile, utcnow
from tests.support.http import local_client

ROWS = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
        for i in range(4)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TestClient]:
    data_dir = tmp_path_factory.mktemp("files-api")
    (data_dir / "models").symlink_to(tiny_model_dir.parent)
    settings = Settings(data_dir=data_dir, base_model="tiny-qwen3", torch_threads=1, max_files=3,
                        max_file_mb=1, max_file_storage_mb=2)
    with local_client(create_app(build_runtime(settings))) as c:
        yield c


def oai(client: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=key, http_client=client, max_retries=0)


def upload(client: TestClient, key: str, content: bytes = JSONL, name: str = "train.jsonl",
           purpose: str | None = "fine-tune", prefix: str = "/v1", **fields: str):
    data = {**({"purpose": purpose} if purpose else {}), **fields}
    return client.post(f"{prefix}/files", headers={"Authorization": f"Bearer {key}"},
                       files={"file": (name, content)}, data=data)


def refused(answer, status: int, param: str | None) -> str:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and "Traceback" not in answer.text
    return error["message"]


def staged(client: TestClient) -> list[Path]:
    return list(files.staging_dir(client.app.state.runtime).glob("*"))


def test_the_openai_client_uploads_lists_reads_and_deletes(client: TestClient) -> None:
    api = oai(client, "tml-files-a")
    made = api.files.create(file=("train.jsonl", JSONL), purpose="fine-tune")
    assert made.id.startswith("file-") and made.bytes == len(JSONL) and made.filename == "train.jsonl"
    assert made.purpose == "fine-tune" and made.status == "processed" and made.expires_at is None
    assert api.files.retrieve(made.id) == made
    assert [f.id for f in api.files.list()] == [made.id]
    assert api.files.content(made.id).content == JSONL
    assert api.files.delete(made.id).deleted
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(made.id)
    assert list(api.files.list()) == [] and staged(client) == []


def test_a_file_name_is_a_label_never_a_path(client: TestClient) -> None:
    made = upload(client, "tml-files-path", name="../../etc/passwd.jsonl").json()
    assert made["filename"] == "passwd.jsonl"
    row = asyncio.run(client.app.state.runtime.db.run(lambda s: s.get(UploadedFile, made["id"])))
    assert row.storage_path == f"files/{row.tenant_id}/{made['id']}"


def test_the_same_routes_answer_under_api_v1(client: TestClient) -> None:
    made = upload(client, "tml-files-b", prefix="/api/v1").json()
    answer = client.get(f"/api/v1/files/{made['id']}", headers={"Authorization": "Bearer tml-files-b"})
    assert answer.json() == made


def test_listing_pages_newest_first_and_filters_by_purpose(client: TestClient) -> None:
    key, h = "tml-files-c", {"Authorization": "Bearer tml-files-c"}
    ids = [upload(client, key, purpose=p).json()["id"] for p in ("fine-tune", "user_data", "fine-tune")]
    page = client.get("/v1/files?limit=2", headers=h).json()
    assert [f["id"] for f in page["data"]] == ids[::-1][:2] and page["has_more"] and page["last_id"] == ids[1]
    rest = client.get(f"/v1/files?limit=2&after={page['last_id']}", headers=h).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and not rest["has_more"]
    assert [f["id"] for f in client.get("/v1/files?order=asc", headers=h).json()["data"]] == ids
    assert [f["id"] for f in client.get("/v1/files?purpose=user_data", headers=h).json()["data"]] == [ids[1]]
    refused(client.get("/v1/files?limit=0", headers=h), 400, "query.limit")
    refused(client.get("/v1/files?order=sideways", headers=h), 400, "query.order")
    refused(client.get("/v1/files?after=file-000000000000000000000000", headers=h), 404, "after")


def test_another_tenants_file_is_not_found_anywhere(client: TestClient) -> None:
    made = upload(client, "tml-files-d").json()["id"]
    h = {"Authorization": "Bearer tml-files-e"}
    for answer in (client.get(f"/v1/files/{made}", headers=h), client.get(f"/v1/files/{made}/content", headers=h),
                   client.delete(f"/v1/files/{made}", headers=h)):
        refused(answer, 404, "file_id")
    assert client.get("/v1/files", headers=h).json()["data"] == []
    assert client.get(f"/v1/files/{made}", headers={"Authorization": "Bearer tml-files-d"}).status_code == 200


def test_no_key_is_a_401_before_the_body_is_read(client: TestClient) -> None:
    read = []

    def body() -> Iterator[bytes]:  # the test client hands it over only when the app reads the body
        read.append(True)
        yield b"--b\r\n"

    answer = client.post("/v1/files", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    assert read == []


@pytest.mark.parametrize(("content", "name", "fields", "param", "words"), [
    (JSONL, "train.parquet", {}, "file", "*.jsonl, *.json or *.csv"),
    (JSONL, "x" * 300 + ".jsonl", {}, "file", "1 to 255 characters"),
    (b'{"a": 1}\n{"a": \n', "bad.jsonl", {}, "file", "line 2: not JSON"),
    (b'{"a": NaN}\n', "nan.jsonl", {}, "file", "NaN is not allowed"),
    (b"a,b\n1\n", "bad.csv", {}, "file", "line 2: 1 cells"),
    (JSONL, "train.jsonl", {"purpose": "weights"}, "purpose", "one of: fine-tune"),
    (JSONL, "train.jsonl", {"colour": "red"}, "colour", "unknown form field"),
    (JSONL, "train.jsonl", {"expires_after[anchor]": "last_used"}, "expires_after[anchor]", "created_at"),
    (JSONL, "train.jsonl", {"expires_after[anchor]": "created_at", "expires_after[seconds]": "60"},
     "expires_after[seconds]", "from 3600"),
])
def test_a_bad_upload_is_a_400_naming_its_field_and_keeps_nothing(
        client: TestClient, content: bytes, name: str, fields: dict, param: str, words: str) -> None:
    key = "tml-files-bad"
    answer = upload(client, key, content, name, **({"purpose": "fine-tune"} | fields))
    assert words in refused(answer, 400, param)
    assert client.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).json()["data"] == []
    assert staged(client) == []


def test_an_upload_without_a_purpose_or_a_file_or_multipart_is_a_400(client: TestClient) -> None:
    h = {"Authorization": "Bearer tml-files-f"}
    refused(upload(client, "tml-files-f", purpose=None), 400, "purpose")
    refused(client.post("/v1/files", headers=h, data={"purpose": "fine-tune"}), 400, "file")
    refused(client.post("/v1/files", headers=h, json={"file": "x", "purpose": "fine-tune"}), 400, "file")
    two = [("file", ("a.jsonl", JSONL)), ("extra", ("b.jsonl", JSONL))]
    refused(client.post("/v1/files", headers=h, files=two, data={"purpose": "fine-tune"}), 400, "extra")
    broken = b"--abc\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--abc--"
    answer = client.post("/v1/files", headers={**h, "Content-Type": "multipart/form-data; boundary=xyz"},
                         content=broken)
    assert "well-formed multipart" in refused(answer, 400, "body")
    assert staged(client) == []


def test_a_file_over_the_limit_is_a_413_even_when_chunked(client: TestClient) -> None:
    big = b'{"text": "' + b"x" * (1 << 20) + b'"}\n'
    assert "limit of 1 MiB per file" in refused(upload(client, "tml-files-g", big, "big.jsonl"), 413, "file")
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\r\n").encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        yield body
        for _ in range(40):
            yield b"y" * (64 << 10)
        yield f"\r\n--{boundary}--\r\n".encode()

    answer = client.post("/v1/files", content=chunks(), headers={
        "Authorization": "Bearer tml-files-g", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    refused(answer, 413, "file")
    assert staged(client) == []


def test_a_tenant_holds_at_most_max_files_and_max_file_storage(client: TestClient) -> None:
    key = "tml-files-h"
    made = [upload(client, key).json()["id"] for _ in range(3)]
    assert "holds 3 files" in refused(upload(client, key), 400, "file")
    client.delete(f"/v1/files/{made[0]}", headers={"Authorization": f"Bearer {key}"})
    made[0] = upload(client, key).json()["id"]
    for f in made:
        client.delete(f"/v1/files/{f}", headers={"Authorization": f"Bearer {key}"})
    half = b'{"t": "' + b"z" * (900 << 10) + b'"}\n'
    assert [upload(client, key, half).status_code for _ in range(2)] == [200, 200]
    assert "left of this tenant's file storage (2 MiB)" in refused(upload(client, key, half), 413, "file")


def test_an_expired_file_vanishes_at_once_and_the_reaper_removes_it(client: TestClient) -> None:
    rt, h = client.app.state.runtime, {"Authorization": "Bearer tml-files-i"}
    made = upload(client, "tml-files-i", **{"expires_after[anchor]": "created_at",
                                            "expires_after[seconds]": "3600"}).json()
    assert made["expires_at"] - made["created_at"] == 3600

    def expire(s) -> str:
        row = s.get(UploadedFile, made["id"])
        row.expires_at = utcnow() - timedelta(seconds=1)
        return row.storage_path

    relative = asyncio.run(rt.db.run(expire))
    refused(client.get(f"/v1/files/{made['id']}", headers=h), 404, "file_id")
    assert (rt.data_dir / relative).exists()
    client.portal.call(reap_expired, rt)
    assert not (rt.data_dir / relative).exists()
    assert asyncio.run(rt.db.run(lambda s: s.get(UploadedFile, made["id"]))) is None
