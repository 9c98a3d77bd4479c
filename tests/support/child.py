"""Work a test hands to a child process (multiprocessing's spawn start method imports it there)."""

from __future__ import annotations

import pickle


def sample_in_child(pickled_sampler: bytes, prompt: list[int], num_samples: int) -> list[list[int]]:
    """Unpickle an SDK SamplingClient, as a multiprocess RL worker does, and sample with it."""
    from tinker import types

    sampler = pickle.loads(pickled_sampler)
    result = sampler.sample(types.ModelInput.from_ints(prompt), num_samples, types.SamplingParams(max_tokens=4))
    return [list(s.tokens) for s in result.result().sequences]
