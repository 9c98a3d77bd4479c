"""Train the tiny-qwen3 byte-level BPE tokenizer and write it to workers/tiny_qwen3/.

Run once; the output is committed so that every machine uses the same tokenizer and no
model hub is ever needed:

    .venv/bin/python scripts/make_tiny_tokenizer.py

The corpus is the running interpreter's stdlib `*.py` files, so a different Python
patch release gives a (slightly) different tokenizer. Re-running is only needed if the
recipe changes; `workers.base_models` fingerprints these files, so materialised
tiny-qwen3 folders are rebuilt automatically after a change.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 4096
# Order matters: it fixes the ids (0, 1, 2) that config.json and the server rely on.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added (non-special) tokens of the Qwen3 vocabulary that chat renderers rely on (e.g.
# tinker-cookbook's `qwen3` renderer frames reasoning and tool calls with them). Each must be
# one token; they are not special, so they survive `skip_special_tokens` decoding, as in Qwen3.
# They take the last ids (VOCAB_SIZE - 6 ..), so BPE trains VOCAB_SIZE - len(ADDED_TOKENS) entries.
ADDED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"

# ChatML. No system prompt is injected: the tiny model is random, a default prompt would
# only add tokens to every request.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "workers" / "tiny_qwen3"


def stdlib_corpus() -> list[str]:
    """The stdlib top-level *.py files, sorted so the corpus order is reproducible."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise SystemExit(f"no *.py files found in {stdlib}")
    return [str(f) for f in files]


def train_tokenizer(files: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: decode(encode(s)) must give back s exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(ADDED_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols up front, so any input text is encodable (no unknown token).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    for want_id, token in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(token)
        if got != want_id:
            raise SystemExit(f"{token} got id {got}, expected {want_id}")
    # normalized=False: matched on the raw text, like the special tokens (and Qwen3's own).
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    for offset, token in enumerate(ADDED_TOKENS):
        want_id = VOCAB_SIZE - len(ADDED_TOKENS) + offset
        if tok.token_to_id(token) != want_id:
            raise SystemExit(f"{token} got id {tok.token_to_id(token)}, expected {want_id}")
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"vocab size {tok.get_vocab_size()} != {VOCAB_SIZE}")
    return tok


def tokenizer_config() -> dict:
    # Written by hand rather than by transformers' save_pretrained: 5.x would write
    # "TokenizersBackend", which transformers 4.x cannot load.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_outputs(tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    files = stdlib_corpus()
    tok = train_tokenizer(files)
    write_outputs(tok, args.out)
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"trained on {len(files)} files; wrote {args.out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
