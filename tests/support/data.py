"""Training data and raw request bodies for the integration tests (built with the tinker SDK's types)."""

from __future__ import annotations

import numpy as np

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.getcwd())",
    "for i in range(10):\n    print(i)",
]


def make_data(rows: list[list[int]]):
    """Next-token datums: model_input = seq[:-1], target_tokens = seq[1:], weight 1 per token."""
    from tinker import types

    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(row[:-1]),
            loss_fn_inputs={"target_tokens": row[1:], "weights": np.ones(len(row) - 1, dtype=np.float32)},
        )
        for row in rows
    ]


def fwdbwd_proto(model_id: str, data, loss_fn: str = "cross_entropy", seq_id: int = 10_000) -> bytes:
    """A forward_backward request body as the 0.38 SDK's protobuf encoding, for raw HTTP posts."""
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto  # 0.38 only

    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn), model_id=model_id, seq_id=seq_id
    )
    return forward_backward_request_to_proto(request).SerializeToString()
