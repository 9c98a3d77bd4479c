"""Serving under a path (--root-path), as behind a proxy that exposes the server at
https://host/twinkle: the unmodified SDK works with base_url=.../twinkle, signed links carry the
path, and a proxy that strips the path before forwarding is served too."""

from __future__ import annotations

import httpx
import pytest
import tinker
from tinker import types

from server.process import running_server
from tests.support.data import make_data

pytestmark = pytest.mark.slow
BASE, KEY = "tiny-qwen3", "tml-root-path"


def test_the_sdk_trains_saves_and_samples_under_a_root_path(tmp_path, tiny_model_dir, token_rows) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-qwen3").symlink_to(tiny_model_dir)
    with running_server(tmp_path, extra_args=["--root-path", "/twinkle"]) as server:
        assert server.base_url.endswith("/twinkle")
        with tinker.ServiceClient(base_url=server.base_url, api_key=KEY) as sc:
            tc = sc.create_lora_training_client(BASE, rank=4, seed=0).result()
            tc.forward_backward(make_data(token_rows), "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            sampler = tc.save_weights_and_get_sampling_client().result()
            out = sampler.sample(types.ModelInput.from_ints(token_rows[0][:4]), 1, types.SamplingParams(max_tokens=3))
            assert len(out.result().sequences) == 1
            saved = tc.save_weights_external("under-a-path").result()
            rest = tinker.RestClient(base_url=server.base_url, api_key=KEY)
            urls = rest.get_external_weights_urls(saved.path).result().urls
        assert urls and all(url.startswith(server.base_url + "/") for url in urls.values())
        assert all(httpx.get(url, timeout=30).status_code == 200 for url in urls.values())
        stripped = server.base_url.removesuffix("/twinkle")  # what a proxy that strips the path forwards
        assert httpx.get(f"{stripped}/api/v1/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{server.base_url}/api/v1/healthz", timeout=10).status_code == 200
