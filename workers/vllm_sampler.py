"""Token sampling on vLLM (``--sampler vllm``), with the contract of ``workers.sampler.sample_batch``.

The returned logprobs are the model's own at temperature 1 (vLLM's ``logprobs_mode="raw_logprobs"``:
log_softmax of the raw logits, before temperature, top-k and top-p; prompt logprobs are always raw).
Stop tokens (and EOS when ``stop_at_eos``) are kept at the end of the sampled tokens; a stop string
ends a row at the token whose decoded text first contains it, as the hf sampler does.

What differs from the hf sampler, by design of vLLM:
* The tokens drawn for a seed are vLLM's (its own per-request generator), not the hf sampler's; a
  seed gives the same tokens again within vLLM. Row r of a request is its own vLLM request seeded
  from (seed, r), so rows never share draws (vLLM's own ``n`` seeds child r with seed + r, which
  would give request seed s row 1 the tokens of request seed s + 1 row 0).
* Logprobs match the trainer's within float tolerance (another kernel set), not bit for bit.
* 0 < temperature < 0.01 is raised to 0.01 by vLLM; temperature 0 is greedy.
* ``target_prompt_logprobs`` and ``prompt_alt_tokens`` need the full next-token distribution at
  every prompt position: vLLM returns it (prompt_logprobs = vocab) only up to
  ``FULL_PROMPT_CELLS`` cells per request, beyond that the request is refused.

Adapter versions (``AdapterSource``) become vLLM LoRA adapters, one ``LoRARequest`` per version
key with an id of its own, loaded when first used and kept in an LRU of ``max_cpu_loras``. A version
held only in memory is written for vLLM to a tmpfs folder (/dev/shm), never to disk, and that folder
goes when the version is forgotten or evicted.

vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): engine start in seconds rather
than 30-40 s, and no child processes to spawn. Not thread-safe: one compute thread uses it.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workers.adapter_versions import AdapterSource
from workers.peft_host import AdapterError
from workers.sampler import check_job
from workers.types import (
    TOPK_EMPTY_ID,
    TOPK_EMPTY_LOGPROB,
    BaseModelInfo,
    SampledSequence,
    SampleJob,
    SampleOutput,
    TopK,
)

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest

# Set before vLLM is imported (unless the environment says otherwise).
VLLM_ENV_DEFAULTS = {
    "VLLM_HOST_IP": "127.0.0.1",  # vLLM would otherwise announce the machine's public address
    "VLLM_NO_USAGE_STATS": "1",  # vLLM reports usage statistics to the internet by default
    "VLLM_DO_NOT_TRACK": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in this process: 5-7 s start instead of 30-40 s
}
# Full prompt distributions (target_prompt_logprobs, prompt_alt_tokens) are returned by vLLM as
# Python lists: len(prompt) x vocab numbers. This many per request at most (~0.5 GB of lists, ~3 s).
FULL_PROMPT_CELLS = 1 << 22
TMPFS = Path("/dev/shm")
TMPFS_PREFIX = "twinkle-vllm-"
INSTALL_HINT = "run `make install-vllm` and start the server from .venv-vllm (.venv-vllm/bin/twinkle)"


@dataclass
class _Version:
    request: LoRARequest
    tmp_dir: Path | None  # our tmpfs copy of an in-memory version; None: vLLM reads a checkpoint


class VllmSampler:
    """One vLLM engine over the base model in ``model_dir``; samples on adapter versions."""

    def __init__(
        self,
        model_dir: Path,
        info: BaseModelInfo,
        *,
        dtype: str = "float32",
        max_lora_rank: int = 64,
        max_loras: int = 4,
        max_cpu_loras: int = 8,
        max_model_len: int | None = None,
        seed: int = 0,
        kv_cache_bytes: int = 1 << 30,
    ) -> None:
        self._info = info
        self._max_cpu_loras = max_cpu_loras
        self._llm = _build_llm(
            model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len or info.max_context_length,
            kv_cache_bytes=kv_cache_bytes, max_lora_rank=_vllm_max_rank(max_lora_rank),
            max_loras=min(max_loras, max_cpu_loras),  # vLLM requires max_loras <= max_cpu_loras
            max_cpu_loras=max_cpu_loras,
        )
        self._tokenizer = self._llm.get_tokenizer()
        self._versions: OrderedDict[str, _Version] = OrderedDict()  # least recently used first
        self._next_lora_id = 1
        self._tmp_root = TMPFS / f"{TMPFS_PREFIX}{os.getpid()}"
        _remove_stale_tmp_dirs()

    # ----- sampling --------------------------------------------------------------------------
    def sample_batch(self, adapter: AdapterSource | None, jobs: Sequence[SampleJob]) -> list[SampleOutput]:
        """One ``SampleOutput`` per job, in order; every job is checked before any compute."""
        if not jobs:
            return []
        for i, job in enumerate(jobs):
            check_job(job, self._info.vocab_size, f"jobs[{i}]")
            self._check_supported(job, f"jobs[{i}]")
        plans = [_plan(job, self._info) for job in jobs]
        prompts, params = [], []
        for job, plan in zip(jobs, plans):
            for row_params in plan.requests:
                prompts.append({"prompt_token_ids": [int(t) for t in job.prompt]})
                params.append(row_params)
        lora = self._lora_request(adapter) if adapter is not None else None
        results = self._llm.generate(prompts, params, use_tqdm=False, lora_request=lora) if prompts else []
        outputs, at = [], 0
        for job, plan in zip(jobs, plans):
            outputs.append(self._output(job, plan, results[at : at + len(plan.requests)]))
            at += len(plan.requests)
        return outputs

    def _check_supported(self, job: SampleJob, where: str) -> None:
        s = job.scoring
        full = s.target_ids is not None or s.alt_tokens_k > 0
        if full and len(job.prompt) * self._info.vocab_size > FULL_PROMPT_CELLS:
            option = "target_prompt_logprobs" if s.target_ids is not None else "prompt_alt_tokens_k"
            raise AdapterError(
                f"{where}.{option}: the vllm sampler computes it from the full next-token distribution at every "
                f"prompt position and supports at most {FULL_PROMPT_CELLS} cells (len(prompt) x vocab "
                f"{self._info.vocab_size}) for it; this prompt has {len(job.prompt)} tokens. Use a shorter prompt "
                "or a server started with --sampler hf"
            )

    def _output(self, job: SampleJob, plan: _Plan, results: list[RequestOutput]) -> SampleOutput:
        if job.params.max_tokens == 0:  # vLLM samples at least one token; the request asked for none
            empty = SampledSequence(tokens=[], logprobs=[], stop_reason="length", topk=_empty_topk(job.topk_sample))
            sequences = [empty] * job.num_samples
        else:
            rows = results[: plan.rows]
            if len(rows) == 1:  # greedy: every row is the same
                rows = rows * job.num_samples
            sequences = [self._sequence(job, r.outputs[0]) for r in rows]
        return _prompt_output(job, plan, None if plan.scoring is None else results[plan.scoring], sequences)

    def _sequence(self, job: SampleJob, completion: Any) -> SampledSequence:
        params = job.params
        tokens = list(completion.token_ids)
        stopped = completion.finish_reason == "stop"
        cut = self._stop_string_end(tokens, params.stop_strings)
        if cut is not None:
            tokens, stopped = tokens[:cut], True
        lps, topk = _sample_logprobs(completion.logprobs, len(tokens), job.topk_sample)
        return SampledSequence(tokens=tokens, logprobs=lps, stop_reason="stop" if stopped else "length", topk=topk)

    def _stop_string_end(self, tokens: list[int], stop_strings: Sequence[str]) -> int | None:
        """The hf sampler's rule, on the tokens vLLM returned: a row ends at the first token whose
        decoded prefix (``decode(tokens[:i + 1])``) contains a stop string. vLLM stops there too
        but checks its incremental text, which can differ at the edges; None: no stop string."""
        if not stop_strings or not tokens:
            return None
        found = self._decode(tokens)
        if not any(s in found for s in stop_strings):
            return None
        if not any(s in self._decode(tokens[:-1]) for s in stop_strings):
            return len(tokens)  # the usual case: vLLM stopped at the token that completes it
        for end in range(1, len(tokens)):
            if any(s in self._decode(tokens[:end]) for s in stop_strings):
                return end
        return len(tokens)

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=False)

    # ----- adapter versions ------------------------------------------------------------------
    def _lora_request(self, adapter: AdapterSource) -> LoRARequest:
        version = self._versions.get(adapter.key)
        if version is not None:
            self._versions.move_to_end(adapter.key)
            return version.request
        while len(self._versions) >= self._max_cpu_loras:
            self.forget(next(iter(self._versions)))
        version = self._load(adapter)
        self._versions[adapter.key] = version
        return version.request

    def _load(self, adapter: AdapterSource) -> _Version:
        from vllm.lora.request import LoRARequest

        tmp_dir = None
        folder = adapter.folder
        if folder is None:
            folder = tmp_dir = self._tmp_folder(adapter.key)
            adapter.weights().write_peft(tmp_dir)
        lora_id, self._next_lora_id = self._next_lora_id, self._next_lora_id + 1
        # A fresh id per load: vLLM caches weights by id, so an id never names two weight sets.
        request = LoRARequest(lora_name=adapter.key, lora_int_id=lora_id, lora_path=str(folder))
        try:
            # Loaded now rather than inside generate(): a bad adapter fails alone, with its reason.
            self._llm.llm_engine.add_lora(request)
        except Exception as exc:
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            raise _lora_error(adapter.key, exc) from exc
        return _Version(request, tmp_dir)

    def _tmp_folder(self, key: str) -> Path:
        if not TMPFS.is_dir():
            raise RuntimeError(f"the vllm sampler keeps in-memory adapter versions in {TMPFS} (tmpfs); it is missing")
        # The key is a reference string; its hash is a safe folder name.
        return self._tmp_root / hashlib.sha256(key.encode()).hexdigest()[:32]

    def forget(self, key: str) -> None:
        """Release version ``key``: vLLM drops its weights, its tmpfs folder goes. Unknown keys are fine."""
        version = self._versions.pop(key, None)
        if version is None:
            return
        try:
            self._llm.llm_engine.remove_lora(version.request.lora_int_id)
        finally:
            if version.tmp_dir is not None:
                shutil.rmtree(version.tmp_dir, ignore_errors=True)

    def cached(self) -> list[str]:
        """The version keys held (a LoRA loaded in vLLM), least recently used first."""
        return list(self._versions)

    def close(self) -> None:
        for key in list(self._versions):
            self.forget(key)
        with suppress(OSError):  # another sampler of this process may still hold folders there
            self._tmp_root.rmdir()
        engine = getattr(self._llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None:
            core.shutdown()


# ------------------------------------------------------------------------------------------------
# engine
# ------------------------------------------------------------------------------------------------


def import_vllm() -> Any:
    """vLLM, imported with this server's environment defaults; a clear error where it is missing."""
    for name, value in VLLM_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError(f"--sampler vllm needs vLLM, which is not installed here: {INSTALL_HINT}") from exc
    return vllm


def _build_llm(model_dir: Path, *, dtype: str, seed: int, max_model_len: int, kv_cache_bytes: int, **lora: int) -> LLM:
    vllm = import_vllm()
    _patch_lora_logits()
    set_threads = torch.set_num_threads
    # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process and
    # reseeds torch's global RNG; in-process, the trainer shares both: keep them as they were.
    with torch.random.fork_rng(devices=[]):
        try:
            return vllm.LLM(
                model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed, enforce_eager=True,
                max_model_len=max_model_len, kv_cache_memory_bytes=kv_cache_bytes,
                enable_lora=True, **lora,
                # The returned logprobs are the model's own (before temperature/top-k/top-p). This is
                # vLLM 0.32's default; set explicitly as it is the contract.
                logprobs_mode="raw_logprobs",
                max_logprobs=-1,  # top-k logprobs up to the whole vocabulary, as the hf sampler
                # Sampling settings come from each request only, not from generation_config.json.
                generation_config="vllm",
                disable_log_stats=True,
            )
        finally:
            torch.set_num_threads = set_threads


def _patch_lora_logits() -> None:
    """Work around two vLLM 0.32 bugs in the LoRA logits processor (lm_head LoRA, train_unembed).

    * Its LoRA mapping is per request (sampler_indices), but prompt logprobs ask it for one row
      per prompt token (vllm-project/vllm#29955, #51594): on CPU that fails (an einsum size
      mismatch, with or without an adapter), on GPU the lm_head LoRA is silently left out.
    * On CPU "no adapter" (slot -1) indexes the last LoRA slot (Python's [-1]): a base-model
      request gets the lm_head delta of whichever adapter sits there.

    Every request of one VllmSampler.generate() call has the same adapter (or none), so the rows
    of a call all take that adapter's slot, and with none the LoRA delta is skipped."""
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    original = LogitsProcessorWithLoRA._get_logits
    if getattr(original, "twinkle_patched", False):
        return

    def _get_logits(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        with _one_slot_for_all_rows(self.punica_wrapper, hidden_states.shape[0]):
            return original(self, hidden_states, *args, **kwargs)

    _get_logits.twinkle_patched = True  # type: ignore[attr-defined]
    LogitsProcessorWithLoRA._get_logits = _get_logits


@contextmanager
def _one_slot_for_all_rows(wrapper: Any, rows: int) -> Iterator[None]:
    """For one logits call of `rows` rows: every row in the batch's one LoRA slot, or no LoRA delta
    at all when the batch has no adapter."""
    indices = wrapper.sampler_indices
    if not indices.numel() or bool((indices < 0).all()):
        wrapper.add_lora_logits = _no_lora_logits  # shadows the method on this instance, for this call
        try:
            yield
        finally:
            del wrapper.add_lora_logits
        return
    if rows == indices.shape[0]:
        yield
        return
    if not bool((indices == indices[0]).all()):  # never silently wrong; VllmSampler never mixes adapters
        raise RuntimeError("prompt logprobs in a vLLM batch that mixes LoRA adapters")
    saved_len, saved = wrapper.indices_len[1], wrapper._sampler_indices[:rows].clone()
    meta = getattr(wrapper, "prompt_mapping_meta", None)  # the GPU kernels' copy of the mapping
    wrapper._sampler_indices[:rows] = indices[0].item()
    wrapper.indices_len[1] = rows
    if meta is not None:
        meta.prepare_tensors(wrapper.sampler_indices)
    try:
        yield
    finally:
        wrapper._sampler_indices[:rows] = saved
        wrapper.indices_len[1] = saved_len
        if meta is not None:
            meta.prepare_tensors(wrapper.sampler_indices)


def _no_lora_logits(y: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return y


def _vllm_max_rank(rank: int) -> int:
    """vLLM takes only some max_lora_rank values (LoRAConfig.MaxLoRARanks): the smallest that holds `rank`."""
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    for value in allowed:
        if value >= rank:
            return value
    raise ValueError(f"max_lora_rank {rank}: vLLM supports LoRA ranks up to {allowed[-1]}")


def _remove_stale_tmp_dirs() -> None:
    """tmpfs folders of sampler processes that died without close(): they would hold RAM forever."""
    if not TMPFS.is_dir():
        return
    for path in TMPFS.glob(f"{TMPFS_PREFIX}*"):
        pid = path.name[len(TMPFS_PREFIX) :]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lora_error(key: str, exc: Exception) -> Exception:
    text = str(exc)
    if "lm_head" in text:
        return AdapterError(f"the vllm sampler cannot load this adapter's lm_head LoRA (train_unembed): {text}")
    if isinstance(exc, ValueError):
        return AdapterError(f"the vllm sampler cannot load adapter version {key}: {text}")
    return exc


# ------------------------------------------------------------------------------------------------
# requests
# ------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """A job's vLLM requests: its rows, then (when asked for) one that scores the prompt."""

    requests: list[SamplingParams]
    rows: int  # requests[:rows] are rows; a single one when every row is the same (greedy)
    scoring: int | None  # the index of the request that scores the prompt (0, or the last one)
    prompt_k: int | None  # prompt_logprobs asked of vLLM (its top-k size); None: not scored
    seed: int


def _plan(job: SampleJob, info: BaseModelInfo) -> _Plan:
    from vllm import SamplingParams

    p, s = job.params, job.scoring
    prompt_k = None
    if s.target_ids is not None or s.alt_tokens_k > 0:
        prompt_k = info.vocab_size  # the full distribution, sorted
    elif s.logprobs or s.topk > 0:
        prompt_k = s.topk  # 0: the prompt token's own logprob only
    seed = random.getrandbits(63) if p.seed is None else p.seed % (1 << 64)  # as the hf sampler
    stop_ids = sorted(set(p.stop_tokens) | (set(info.eos_token_ids) if p.stop_at_eos else set()))
    rows = 0 if p.max_tokens == 0 else 1 if p.temperature == 0 else job.num_samples
    # Row 0 scores the prompt unless it decodes text (for stop strings): vLLM would decode the id of
    # every prompt logprob too, seconds for a full distribution. Then a request of its own does.
    scoring = None if prompt_k is None else 0 if rows and not p.stop_strings else rows
    try:
        requests = [
            SamplingParams(
                n=1, temperature=p.temperature, top_k=p.top_k if p.top_k > 0 else 0, top_p=p.top_p,
                seed=_row_seed(seed, r), max_tokens=p.max_tokens,
                # Stops are ours: the request's stop tokens plus the model's EOS ids (when asked),
                # never vLLM's own idea of EOS.
                ignore_eos=True, stop_token_ids=stop_ids, stop=list(p.stop_strings) or None,
                include_stop_str_in_output=True, skip_special_tokens=False, detokenize=bool(p.stop_strings),
                logprobs=job.topk_sample, prompt_logprobs=prompt_k if r == scoring else None, flat_logprobs=True,
            )
            for r in range(rows)
        ]
    except ValueError as exc:  # vLLM's own check of a value the schemas let through
        raise AdapterError(f"the vllm sampler refuses these sampling params: {exc}") from None
    if scoring == rows and prompt_k is not None:  # one token, greedy, undecoded: for its prompt logprobs only
        requests.append(SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=prompt_k,
                                       flat_logprobs=True, detokenize=False))
    return _Plan(requests, rows, scoring, prompt_k, seed)


def _row_seed(seed: int, row: int) -> int:
    digest = hashlib.sha256(f"{seed}:row{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any int64 field takes it


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------


def _sample_logprobs(flat: Any, n: int, k: int) -> tuple[list[float], TopK | None]:
    """FlatLogprobs of a completion: each position holds the sampled token first, then the top k."""
    starts = flat.start_indices[:n]
    values = flat.logprobs
    lps = [float(values[i]) for i in starts]
    if k == 0:
        return lps, None
    ids = np.empty((n, k), np.int64)
    top = np.empty((n, k), np.float32)
    for row, i in enumerate(starts):
        ids[row] = flat.token_ids[i + 1 : i + 1 + k]
        top[row] = values[i + 1 : i + 1 + k]
    return lps, TopK(token_ids=ids, logprobs=top)


def _empty_topk(k: int) -> TopK | None:
    return TopK(np.empty((0, k), np.int64), np.empty((0, k), np.float32)) if k > 0 else None


def _prompt_output(
    job: SampleJob, plan: _Plan, result: RequestOutput | None, sequences: list[SampledSequence]
) -> SampleOutput:
    s, n = job.scoring, len(job.prompt)
    if result is None or plan.prompt_k is None:
        return SampleOutput(sequences=sequences)
    first_scored = 1 if s.last_n is None else n - s.last_n  # first prompt position scored
    own, top_ids, top_lps = _prompt_rows(result.prompt_logprobs, n, plan.prompt_k)
    prompt_lp = topk = target = alt = None
    if s.logprobs:
        prompt_lp = [math.nan] * first_scored + own[first_scored:].astype(np.float64).tolist()
    if s.topk > 0:
        ids = np.full((n, s.topk), TOPK_EMPTY_ID, dtype=np.int64)
        lps = np.full((n, s.topk), TOPK_EMPTY_LOGPROB, dtype=np.float32)
        ids[first_scored:] = top_ids[first_scored:, : s.topk]
        lps[first_scored:] = top_lps[first_scored:, : s.topk]
        topk = TopK(token_ids=ids, logprobs=lps)
    if s.target_ids is not None or s.alt_tokens_k > 0:
        dist = _full_distribution(top_ids, top_lps, n)
        if s.target_ids is not None:
            target = _target_logprobs(np.asarray(s.target_ids, dtype=np.int64), dist)
        if s.alt_tokens_k > 0:
            alt = _alt_tokens(job, plan.seed, dist)
    return SampleOutput(
        sequences=sequences, prompt_logprobs=prompt_lp, topk_prompt=topk, target_prompt_logprobs=target,
        alt_tokens=None if alt is None else alt[0], alt_logprobs=None if alt is None else alt[1],
    )


def _prompt_rows(flat: Any, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vLLM's prompt logprobs as arrays: the prompt token's own logprob [n] (NaN at position 0) and
    the top k [n, k] (position 0 empty). Position p holds the prompt token first, then the top k."""
    own = np.full(n, np.nan, dtype=np.float32)
    ids = np.full((n, k), TOPK_EMPTY_ID, dtype=np.int64)
    lps = np.full((n, k), TOPK_EMPTY_LOGPROB, dtype=np.float32)
    for p in range(1, n):
        i = flat.start_indices[p]
        own[p] = flat.logprobs[i]
        ids[p] = flat.token_ids[i + 1 : i + 1 + k]
        lps[p] = flat.logprobs[i + 1 : i + 1 + k]
    return own, ids, lps


def _full_distribution(ids: np.ndarray, lps: np.ndarray, n: int) -> np.ndarray:
    """[n - 1, vocab]: row r is the logprobs of prompt position r + 1 (from the sorted full top-k)."""
    dist = np.empty((n - 1, ids.shape[1]), dtype=np.float32)
    rows = np.arange(n - 1)[:, None]
    dist[rows, ids[1:]] = lps[1:]
    return dist


def _target_logprobs(wanted: np.ndarray, dist: np.ndarray) -> np.ndarray:
    target = np.zeros(wanted.shape, dtype=np.float32)
    rows, cols = np.nonzero(wanted != -1)
    target[rows, cols] = dist[rows, wanted[rows, cols]]
    return target


def _alt_tokens(job: SampleJob, seed: int, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The hf sampler's draws (workers.sampler._alt_tokens): k with replacement at the request's
    temperature, no top-k/top-p, from a generator of their own; softmax(logprobs / T) is
    softmax(logits / T), so the same logits give the same tokens."""
    from workers.sampler import derived_seed

    k, rows = job.scoring.alt_tokens_k, dist.shape[0]
    if rows == 0:
        return np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    logprobs = torch.from_numpy(dist)
    temperature = job.params.temperature
    if temperature == 0:
        tokens = logprobs.argmax(dim=-1, keepdim=True).expand(rows, k)
    else:
        gen = torch.Generator().manual_seed(derived_seed(seed, "prompt_alt_tokens"))
        tokens = torch.multinomial(torch.softmax(logprobs / temperature, dim=-1), k, replacement=True, generator=gen)
    return tokens.numpy().astype(np.int64), logprobs.gather(-1, tokens).numpy().astype(np.float32)
