"""The unmodified tinker SDK's RestClient (and ServiceClient.copy_weights) against a real server
process: checkpoint listing, TTL, publish, weights info, signed downloads, copies, deletion,
sessions, trace export, and the hosted-only endpoints."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tinker
from tinker import types
from tinker.lib.client_connection_pool_type import ClientConnectionPoolType

pytestmark = pytest.mark.slow
BASE = "tiny-qwen3"


def service(server, key: str, **kwargs) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.base_url, api_key=key, **kwargs)


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:  # a plain GET, no API key
        return response.read()


def signed_urls(rc: tinker.RestClient, tinker_path: str) -> types.ExternalWeightsUrlsResponse:
    """The SDK's own resource call: RestClient.get_external_weights_urls refuses any path that is
    not external_weights/ before sending, and this server serves links for every kind."""
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)

    async def call() -> types.ExternalWeightsUrlsResponse:
        with rc.holder.aclient(ClientConnectionPoolType.TRAIN) as client:
            return await client.weights.get_external_weights_urls(
                model_id=parsed.training_run_id, checkpoint_id=parsed.checkpoint_id
            )

    return rc.holder.run_coroutine_threadsafe(call()).result()


def test_checkpoint_management_through_the_sdk(server, data_dir: Path) -> None:
    with service(server, "tml-rest-owner", project_id="proj-rest") as sc:
        tc = sc.create_lora_training_client(BASE, rank=4, seed=0).result()
        run = tc.model_id
        state = tc.save_state("s1").result().path
        sampler_path = tc.save_weights_for_sampler("w1").result().path
        short = tc.save_state("short-lived", ttl_seconds=1).result().path
        rc = sc.create_rest_client()
        other = tinker.RestClient(base_url=server.base_url, api_key="tml-rest-stranger")

        # Listings; the 1 s checkpoint vanishes as soon as it expires (no reaper needed for that).
        time.sleep(1.1)
        listing = rc.list_checkpoints(run).result()
        assert [c.checkpoint_id for c in listing.checkpoints] == ["weights/s1", "sampler_weights/w1"]
        with pytest.raises(tinker.NotFoundError):
            rc.get_weights_info_by_tinker_path(short).result()
        page = rc.list_user_checkpoints(limit=1).result()
        assert [c.tinker_path for c in page.checkpoints] == [sampler_path]  # newest first
        assert page.cursor is not None and page.cursor.total_count == 2

        info = rc.get_weights_info_by_tinker_path(state).result()
        assert (info.base_model, info.is_lora, info.lora_rank) == (BASE, True, 4)

        # TTL: set, clear, refuse a negative one.
        rc.set_checkpoint_ttl_from_tinker_path(state, 3600).result()
        assert rc.list_checkpoints(run).result().checkpoints[0].expires_at is not None
        rc.set_checkpoint_ttl_from_tinker_path(state, None).result()
        assert rc.list_checkpoints(run).result().checkpoints[0].expires_at is None
        with pytest.raises(tinker.BadRequestError):
            rc.set_checkpoint_ttl_from_tinker_path(state, -1).result()

        # Publish: readable by another tenant until unpublished; never changeable by them.
        with pytest.raises(tinker.NotFoundError):
            other.get_weights_info_by_tinker_path(state).result()
        rc.publish_checkpoint_from_tinker_path(state).result()
        assert other.get_weights_info_by_tinker_path(state).result().lora_rank == 4
        assert [c.tinker_path for c in other.list_checkpoints(run).result().checkpoints] == [state]
        with pytest.raises(tinker.NotFoundError):
            other.publish_checkpoint_from_tinker_path(sampler_path).result()
        with pytest.raises(tinker.NotFoundError):
            other.delete_checkpoint_from_tinker_path(state).result()
        rc.unpublish_checkpoint_from_tinker_path(state).result()
        with pytest.raises(tinker.NotFoundError):
            other.get_weights_info_by_tinker_path(state).result()

        # Signed download links: every file, byte for byte as listed; a changed link is refused.
        links = signed_urls(rc, sampler_path)
        assert "adapter_model.safetensors" in links.urls and links.expires.tzinfo is not None
        sizes = {name: len(download(url)) for name, url in links.urls.items()}
        assert sum(sizes.values()) == listing.checkpoints[1].size_bytes
        url = links.urls["adapter_config.json"]
        assert json.loads(download(url))["r"] == 4
        with pytest.raises(urllib.error.HTTPError) as refused:
            download(url.replace("signature=", "signature=x"))
        assert refused.value.code == 403 and "signature" in json.loads(refused.value.read())["error"]
        with pytest.raises(tinker.NotFoundError):
            rc.get_external_weights_urls(f"tinker://{run}/external_weights/none").result()

        # Copy into this client's project: a new, listed run whose checkpoint loads.
        copied = sc.copy_weights(state).result()
        copy_run = types.ParsedCheckpointTinkerPath.from_tinker_path(copied).training_run_id
        assert copied == f"tinker://{copy_run}/weights/s1" and copy_run != run
        in_project = {r.training_run_id for r in rc.list_training_runs(project_id="proj-rest").result().training_runs}
        assert {run, copy_run} <= in_project
        assert rc.get_training_run(copy_run).result().lora_rank == 4
        with pytest.raises(tinker.NotFoundError):
            tinker.ServiceClient(base_url=server.base_url, api_key="tml-rest-stranger",
                                 project_id="p").copy_weights(state).result()
        resumed = sc.create_training_client_from_state(copied).result()
        assert resumed.get_info().lora_rank == 4

        # Delete: the folder goes; a second delete is not found.
        ckpt_id = url.split("/signed/checkpoints/")[1].split("/")[0]
        (folder,) = data_dir.glob(f"checkpoints/*/{ckpt_id}")
        rc.delete_checkpoint_from_tinker_path(sampler_path).result()
        assert not folder.exists()
        with pytest.raises(tinker.NotFoundError):
            rc.delete_checkpoint_from_tinker_path(sampler_path).result()
        with pytest.raises(urllib.error.HTTPError) as gone:
            download(url)
        assert gone.value.code == 404
        assert [c.checkpoint_id for c in rc.list_checkpoints(run).result().checkpoints] == ["weights/s1"]


def test_sessions_through_the_sdk(server) -> None:
    with service(server, "tml-rest-sessions", user_metadata={"team": "rest"}, display_name="rest nightly") as sc:
        session_id = sc.holder.get_session_id()
        tc = sc.create_lora_training_client(BASE, rank=4, seed=0).result()
        sampler = tc.save_weights_and_get_sampling_client().result()
        sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 1, types.SamplingParams(max_tokens=2, seed=0)).result()
        rc = sc.create_rest_client()

        assert session_id in rc.list_sessions().result().sessions
        got = rc.get_session(session_id).result()
        assert got.training_run_ids == [tc.model_id] and len(got.sampler_ids) == 1
        assert got.user_metadata == {"team": "rest"} and got.display_name == "rest nightly"
        assert rc.get_sampler(got.sampler_ids[0]).result().base_model == BASE

        rc.assign_session_project(session_id, "proj-moved").result()
        runs = rc.list_training_runs(project_id="proj-moved").result()
        assert [r.training_run_id for r in runs.training_runs] == [tc.model_id] and runs.cursor.total_count == 1

        found = rc.search_sessions(types.SessionSearchRequest(display_name="NIGHTLY", user_metadata={"team": "rest"})).result()
        assert [x.session_id for x in found.sessions] == [session_id]
        assert found.sessions[0].project_id == "proj-moved" and found.sessions[0].status.type == "active"

        trace = json.loads(download(rc.export_session_trace(session_id).result()))
        ops = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        assert {"create_model", "save_weights_for_sampler", "sample"} <= {e["name"] for e in ops}
        assert all(e["args"]["state"] == "done" and e["args"]["request_id"] for e in ops)

        stranger = tinker.RestClient(base_url=server.base_url, api_key="tml-rest-stranger")
        with pytest.raises(tinker.NotFoundError):
            stranger.get_session(session_id).result()
        with pytest.raises(tinker.NotFoundError):
            stranger.export_session_trace(session_id).result()
        with pytest.raises(RuntimeError, match="JWT"):  # the SDK reads whoami from a JWT; this server issues none
            rc.whoami().result()
        with pytest.raises(tinker.NotFoundError, match="hosted-service endpoint"):
            tinker.AdminClient(base_url=server.base_url, api_key="tml-rest-sessions").get_audit_log().result()


def test_published_checkpoint_is_loadable_and_samplable_by_other_tenants(server) -> None:
    with service(server, "tml-rest-publisher") as owner, service(server, "tml-rest-reader") as reader:
        tc = owner.create_lora_training_client(BASE, rank=4, seed=0).result()
        state = tc.save_state("pub").result().path
        weights = tc.save_weights_for_sampler("pub").result().path
        rest = owner.create_rest_client()
        rest.publish_checkpoint_from_tinker_path(state).result()
        rest.publish_checkpoint_from_tinker_path(weights).result()
        assert reader.create_training_client_from_state(state).result().get_info().lora_rank == 4
        sampling = reader.create_sampling_client(model_path=weights, base_model=BASE).result()
        out = sampling.sample(types.ModelInput.from_ints([5, 6]), 1, types.SamplingParams(max_tokens=2, seed=0)).result()
        assert len(out.sequences) == 1
        rest.unpublish_checkpoint_from_tinker_path(weights).result()
        with pytest.raises(tinker.NotFoundError):  # unpublished: a stranger's path is not found again
            reader.create_sampling_client(model_path=weights, base_model=BASE).result()
        with pytest.raises(tinker.NotFoundError, match="no longer available"):  # nor its open samplers
            sampling.sample(types.ModelInput.from_ints([5, 6]), 1, types.SamplingParams(max_tokens=2)).result()
