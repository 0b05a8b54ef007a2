"""Train the bundled example's tokenizer offline: a byte-level BPE of 100 tokens (the example's vocab) on a
few sentences, with the `tokenizers` library, saved as a GPT-2 style HF tokenizer (``GPT2Tokenizer``: read by
transformers 4.x and 5.x, vLLM, TensorRT-LLM and onnxruntime-genai).

    .venv/bin/python examples/make_tokenizer.py examples/llama-tiny-tokenizer

It is a real tokenizer (text in, ids out, ids back to text) for a model with random weights: generated text
is words from this vocabulary, not sense.
"""

from __future__ import annotations

import json
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Tokenizer

VOCAB = 100
SPECIAL = ["<unk>", "<s>", "</s>"]   # ids 0, 1, 2 (Llama's convention)
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a model compiles checkpoints to engines",
    "hello world from megatron",
    "the cat sat on the mat",
    "tensor parallel ranks write their shards",
    "we serve the model and it answers in words",
]


def main(out: str) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=sorted(set("".join(SENTENCES).replace(" ", "Ġ"))))
    tok.train_from_iterator(SENTENCES, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    hf = GPT2Tokenizer(vocab=model["vocab"], merges=merges, unk_token="<unk>", bos_token="<s>",
                       eos_token="</s>")
    assert len(hf) <= VOCAB, len(hf)
    hf.save_pretrained(out)
    print(f"{out}: {len(hf)} tokens; 'hello world' -> {hf.encode('hello world')}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/llama-tiny-tokenizer")
