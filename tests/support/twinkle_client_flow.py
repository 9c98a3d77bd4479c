"""ModelScope's own client, `twinkle_client` (twinkle-kit 0.5.1, unmodified), against a running
Twinkle server: the real-client side of tests/integration/test_twinkle_client.py.

Run with the reference venv's python (never the project's; -P keeps tests/support, which has an
http.py, off sys.path):

    .venv-twinkle-ref/bin/python -P twinkle_client_flow.py FLOWS CONFIG_JSON

FLOWS is a comma-separated list of `service`, `sampler`, `model`, `data`, run in that order in one
client process (one session, as a user's program has). CONFIG_JSON holds base_url, api_key,
base_model, prompt (token ids) and rows (token-id rows to train on), for `sampler` an optional
adapter_uri, and for `data` an optional model_dir (the base model's folder, for Twinkle's own
Template as the reference of the server's encoding).
The last stdout line is `TWINKLE-FLOW <json>`: per flow what the client got back, or the error
it raised (`{"error": "..."}`), so that the pytest side asserts on it and shows it when it fails.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

MARK = "TWINKLE-FLOW "


def http_error(call: Any) -> str:
    """What the client raises for a call that fails (its message carries the status and detail)."""
    try:
        call()
    except Exception as exc:  # requests.HTTPError, TwinkleClientError
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def feature(prompt: list[int]) -> dict[str, list[int]]:
    return {"input_ids": prompt, "labels": [-100] * len(prompt)}


def sequences(samples: list[Any]) -> list[list[dict]]:
    return [[seq.model_dump() for seq in s.sequences] for s in samples]


# ----- service -----------------------------------------------------------------------------------
def service_flow(client: Any, cfg: dict) -> dict:
    from twinkle_client.http import get_base_url, http_post, set_api_key

    url = f"{get_base_url()}/twinkle/session_heartbeat"
    heartbeat = http_post(url, json_data={"session_id": client._session_id})
    unknown = http_error(lambda: http_post(url, json_data={"session_id": "sess-nope"}))
    runs, cursor = client.list_training_runs_with_cursor(limit=5)
    set_api_key("EMPTY_TOKEN")  # the client's default key: not a key of this server
    try:
        bad_key = http_error(client.get_server_capabilities)
    finally:
        set_api_key(cfg["api_key"])
    return {
        "session_id": client._session_id,
        "heartbeat": heartbeat.status_code,
        "unknown_session": unknown,
        "capabilities": [m.model_name for m in client.get_server_capabilities().supported_models],
        "health": client.health_check(),
        "capacity": client.get_capacity_info().model_dump(),
        "runs": [r.training_run_id for r in client.list_training_runs(limit=100)],
        "cursor": cursor.model_dump(),
        "first_page": len(runs),
        "bad_key": bad_key,
        "unknown_run": http_error(lambda: client.get_training_run("no-such-run")),
    }


# ----- sampler -----------------------------------------------------------------------------------
def sampler_flow(client: Any, cfg: dict) -> dict:
    from twinkle_client.sampler import vLLMSampler

    sampler = vLLMSampler(model_id=f"ms://{cfg['base_model']}")
    prompt = cfg["prompt"]
    params = {"max_tokens": 8, "temperature": 1.0, "top_p": 1.0, "logprobs": 1, "num_samples": 2, "seed": 0}
    base = sampler.sample([feature(prompt)], params, num_samples=2)
    scored = sampler.sample([feature(prompt)], {"max_tokens": 0, "prompt_logprobs": 2})
    sampler.set_template("Template", model_id=f"ms://{cfg['base_model']}")
    chat = sampler.sample([{"messages": [{"role": "user", "content": "Say hi."}]}], {"max_tokens": 4, "temperature": 0})
    out = {
        "base": sequences(base),
        "prompt_logprobs": scored[0].prompt_logprobs,
        "topk_prompt_logprobs": scored[0].topk_prompt_logprobs,
        "chat": sequences(chat),
        "unknown_base": http_error(lambda: vLLMSampler(model_id="ms://Nobody/no-model")),
        "bad_labels": http_error(lambda: sampler.sample([{"input_ids": prompt, "labels": prompt}], {"max_tokens": 1})),
        "apply_patch": http_error(lambda: sampler.apply_patch("SomePatch")),
    }
    if cfg.get("adapter_uri"):
        greedy = {"max_tokens": 8, "temperature": 0, "logprobs": 1}
        out["adapter"] = sequences(sampler.sample([feature(prompt)], greedy, adapter_uri=cfg["adapter_uri"]))
    return out


# ----- model (needs the model app) ---------------------------------------------------------------
def model_flow(client: Any, cfg: dict) -> dict:
    """Contract §4.2 end to end: an adapter trained five steps, saved twice, sampled by adapter_uri,
    then found, described and deleted through TwinkleClient."""
    from peft import LoraConfig
    from twinkle_client.model import MultiLoraTransformersModel
    from twinkle_client.sampler import vLLMSampler

    model = MultiLoraTransformersModel(model_id=f"ms://{cfg['base_model']}")
    model.add_adapter_to_model("A", LoraConfig(r=8, lora_alpha=32, target_modules="all-linear"),
                               gradient_accumulation_steps=1)
    model.set_loss("CrossEntropyLoss")
    model.set_optimizer("AdamW", lr=3e-3)
    batch = [{"input_ids": row, "labels": row[1:] + [-100]} for row in cfg["rows"]]
    losses = []
    for _ in range(5):
        losses.append(model.forward_backward(inputs=batch).result["loss"])
        model.clip_grad_and_step(max_grad_norm=1.0, norm_type=2)
    metric = model.calculate_metric(is_training=True).result
    capacity = client.get_capacity_info().model_dump()
    final = model.save("final")
    saved = model.save("sampler", is_sampler=True)
    params = {"max_tokens": 8, "temperature": 1.0, "logprobs": 1, "num_samples": 2, "seed": 0}
    sampled = vLLMSampler(model_id=f"ms://{cfg['base_model']}").sample(
        [feature(cfg["prompt"])], params, adapter_uri=saved.twinkle_path, num_samples=2)
    run_id = final.twinkle_path.removeprefix("twinkle://").split("/")[0]
    checkpoints = client.list_checkpoints(run_id)
    primitives = primitives_flow(model, batch, final.twinkle_path)
    return {
        "primitives": primitives,
        "losses": losses,
        "metric": metric,
        "capacity": capacity,
        "final": final.twinkle_path,
        "sampler": saved.twinkle_path,
        "sampled": sequences(sampled),
        "run_id": run_id,
        "checkpoints": [c.model_dump(mode="json") for c in checkpoints],
        "checkpoint_path": client.get_checkpoint_path(run_id, "weights/final").model_dump(),
        "weights_info": client.get_weights_info(final.twinkle_path).model_dump(),
        "deleted": client.delete_checkpoint(run_id, "weights/final").model_dump(),
        "after_delete": [c.checkpoint_id for c in client.list_checkpoints(run_id)],
    }


def primitives_flow(model: Any, batch: list[dict], final_path: str) -> dict:
    """The nice-to-have model calls (contract §4.3) on the trained adapter: a step taken by hand with
    a warmup scheduler, forward_only, the split step, configs, a save with its optimizer and a
    resume from it, a load, and the refused upload."""
    model.set_lr_scheduler("CosineWarmupScheduler", num_warmup_steps=1, num_training_steps=4)
    out: dict[str, Any] = {"lrs": []}
    for _ in range(2):
        model.forward_backward(inputs=batch)
        out["grad_norm"] = model.clip_grad_norm(max_grad_norm=1.0, norm_type=2).result
        model.step()
        model.zero_grad()
        model.lr_step()
        out["lrs"].append(model.calculate_metric(is_training=True).result.get("learning rate(param group 1)"))
    out["forward_only"] = len(model.forward_only(inputs=batch).result["logps"])
    model.forward(inputs=batch)
    out["split_loss"] = model.calculate_loss().result
    model.backward()
    out["configs"] = model.get_train_configs().result
    mid = model.save("mid", save_optimizer=True, consumed_train_samples=8)
    out["resumed"] = model.resume_from_checkpoint(mid.twinkle_path)
    model.load(final_path)
    out["upload"] = http_error(lambda: model.upload_to_hub(checkpoint_dir=mid.twinkle_path, hub_model_id="me/x"))
    return out


# ----- data (needs the processor app and the model app) ------------------------------------------
FEATURE_KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "length")
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "See you."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1, 2, 3."}],
]
SELF_COGNITION = [{"query": "Who are you?", "response": "I am {{NAME}}, trained by {{AUTHOR}}."}]


def features(rows: list[dict]) -> list[dict]:
    """The InputFeature part of encoded rows, as plain lists."""
    def plain(v: Any) -> Any:
        return v.tolist() if hasattr(v, "tolist") else v

    return [{k: plain(r[k]) for k in FEATURE_KEYS} for r in rows]


def twinkle_encoded(model_dir: str, trajectories: list[dict]) -> list[dict]:
    """What Twinkle's own Template makes of the same rows, in this process (the reference)."""
    from twinkle.template import Template

    return features(Template(model_id=model_dir, max_length=512).batch_encode(trajectories))


def upload_chats(cfg: dict) -> str:
    """CHATS as a JSON Lines file, uploaded as a user would (`POST /v1/files`, OpenAI's Files API)."""
    import requests

    content = "".join(json.dumps({"messages": m}) + "\n" for m in CHATS).encode()
    answer = requests.post(f"{cfg['base_url'].rstrip('/')}/v1/files", files={"file": ("chats.jsonl", content)},
                           data={"purpose": "fine-tune"}, headers={"Authorization": f"Bearer {cfg['api_key']}"},
                           timeout=60)
    answer.raise_for_status()
    return answer.json()["id"]


def data_flow(client: Any, cfg: dict) -> dict:
    """Server-side data: rows sent in a DatasetMeta or uploaded as a file, templated and encoded on the server, iterated by
    a DataLoader until StopIteration, two batches trained; Twinkle's Template encodes the same rows
    here as the reference."""
    from peft import LoraConfig
    from twinkle.dataset import DatasetMeta
    from twinkle.preprocessor import SelfCognitionProcessor
    from twinkle_client.dataloader import DataLoader
    from twinkle_client.dataset import Dataset, LazyDataset
    from twinkle_client.model import MultiLoraTransformersModel

    model_id = f"ms://{cfg['base_model']}"
    dataset = Dataset(dataset_meta=DatasetMeta(data=[{"messages": m} for m in CHATS]))
    dataset.set_template("Template", model_id=model_id, max_length=512)
    dataset.encode(add_generation_prompt=False)
    encoded = [dataset[i] for i in range(len(dataset))]
    cognition = Dataset(dataset_meta=DatasetMeta(data=SELF_COGNITION))
    cognition.set_template("Template", model_id=model_id, max_length=512)
    cognition.map("SelfCognitionProcessor", init_args={"model_name": "Twinkle", "model_author": "ModelScope"})
    cognition.encode()
    from_file = Dataset(dataset_meta=DatasetMeta(dataset_id=upload_chats(cfg)))
    from_file.set_template("Template", model_id=model_id, max_length=512)
    from_file.encode(add_generation_prompt=False)
    lazy = LazyDataset(dataset_meta=DatasetMeta(data=[{"messages": CHATS[0]}]))
    lazy.set_template("Template", model_id=model_id, max_length=512)
    lazy.encode()

    model = MultiLoraTransformersModel(model_id=model_id)
    model.add_adapter_to_model("D", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                               gradient_accumulation_steps=1)
    model.set_optimizer("AdamW", lr=1e-2)
    loader = DataLoader(dataset=dataset, batch_size=2)
    losses, sizes = [], []
    for batch in loader:  # __iter__, then __next__ until the server's 410 (StopIteration)
        sizes.append(len(batch))
        losses.append(model.forward_backward(inputs=batch).result["loss"])
        model.clip_grad_and_step()
    out = {
        "length": len(encoded),
        "encoded": features(encoded),
        "messages": [r["messages"] for r in encoded],
        "cognition": features([cognition[0]]),
        "cognition_messages": cognition[0]["messages"],
        "lazy": features([lazy[0]]),
        "from_file": features([from_file[i] for i in range(len(from_file))]),
        "loader_len": len(loader),
        "sizes": sizes,
        "losses": losses,
        "state": loader.get_state(),
        "hub_dataset": http_error(lambda: Dataset(dataset_meta=DatasetMeta("ms://swift/self-cognition"))),
        "save_as": http_error(lambda: dataset.save_as("/tmp/rows.jsonl")),
        "unknown_preprocessor": http_error(lambda: dataset.map("NoSuchProcessor")),
    }
    if cfg.get("model_dir"):  # Twinkle's Template on the same rows
        trajectories = [{"messages": [dict(m) for m in chat]} for chat in CHATS]
        out["reference"] = twinkle_encoded(cfg["model_dir"], trajectories)
        processor = SelfCognitionProcessor(model_name="Twinkle", model_author="ModelScope")
        out["cognition_reference"] = twinkle_encoded(cfg["model_dir"], [processor.preprocess(SELF_COGNITION[0])])
    return out


FLOWS = {"service": service_flow, "sampler": sampler_flow, "model": model_flow, "data": data_flow}


def main(names: str, cfg: dict) -> dict:
    from twinkle_client import init_twinkle_client

    client = init_twinkle_client(base_url=cfg["base_url"], api_key=cfg["api_key"])
    summary: dict[str, Any] = {}
    try:
        for name in names.split(","):
            try:
                summary[name] = FLOWS[name](client, cfg)
            except Exception as exc:  # reported, so the other flows still run and the test says what broke
                summary[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    finally:
        client.close()
    return summary


if __name__ == "__main__":
    result = main(sys.argv[1], json.loads(sys.argv[2]))
    print(MARK + json.dumps(result), flush=True)
