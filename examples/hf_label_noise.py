"""Fine-tune a tiny BERT classifier with Hugging Face ``Trainer`` under label noise, with and without the MGS
penalty, logging the MGS metrics of a fixed probe batch to TensorBoard.

The text is generated (nothing is downloaded): sentences of 6–12 words from a 40-word vocabulary, each with
one or two sentiment words of one polarity, which is the label. A fraction ``--noise`` of the training
labels is flipped; the test set is clean. The model is built from a configuration (BERT, hidden 32, 2 layers)
and the tokenizer is a word-level ``PreTrainedTokenizerFast`` made in memory.

    OMP_NUM_THREADS=1 python examples/hf_label_noise.py                       # α = 0, 0.001, 0.01, 0.1; seeds 0–2
    OMP_NUM_THREADS=1 python examples/hf_label_noise.py --alphas 0 0.03 0.1 --seeds 0
    tensorboard --logdir examples/hf_label_noise/runs                         # eval/accuracy, train/mgs/* per run

Prints per run the clean test accuracy (final and best over epochs), the accuracy on the noisy training labels
(how much noise was memorised) and tr K of the probe at the end, and writes them to ``<out>/results.json``.
The result of the committed configuration is stated in docs/huggingface.md ("Example: label noise").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig, BertForSequenceClassification, DataCollatorWithPadding, PreTrainedTokenizerFast, TrainingArguments,
)
from transformers import logging as hf_logging  # noqa: E402

from mgs_torch.hf import MGSTrainer, MGSTrainerCallback  # noqa: E402

POSITIVE = ["good", "great", "fine", "superb", "lovely", "bright", "happy", "clever", "warm", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak", "sad", "clumsy", "cold", "terrible"]
NEUTRAL = ["the", "a", "movie", "plot", "actor", "scene", "was", "is", "and", "with", "very", "quite", "story", "film",
           "music", "ending", "cast", "it", "this", "that"]
WORDS = ["[PAD]", "[UNK]"] + POSITIVE + NEGATIVE + NEUTRAL


def make_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def sentences(count: int, seed: int) -> tuple[list[str], list[int]]:
    """Random sentences and their true labels: 1 if the sentence's one or two sentiment words are positive."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(count):
        label = rng.randrange(2)
        k = rng.choice([1, 2])
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(6, 12) - k)]
        words += [rng.choice(POSITIVE if label else NEGATIVE) for _ in range(k)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def rows(tokenizer, texts: list[str], labels: list[int]) -> list[dict]:
    return [{**tokenizer(t), "labels": y} for t, y in zip(texts, labels)]


def accuracy(eval_prediction) -> dict[str, float]:
    logits, labels = eval_prediction
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def run(alpha: float, seed: int, args, tokenizer, train, noisy_train_eval, test) -> dict:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16, num_labels=2))
    name = f"alpha{alpha:g}_seed{seed}"
    targs = TrainingArguments(
        output_dir=str(args.out / "checkpoints" / name), run_name=name, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=32, per_device_eval_batch_size=128, learning_rate=args.lr, warmup_steps=0,
        logging_steps=args.logging_steps, eval_strategy="epoch" if args.max_steps < 0 else "no", save_strategy="no",
        report_to="tensorboard", use_cpu=True, seed=seed, disable_tqdm=True,
    )
    monitor = MGSTrainerCallback(max_samples=16, seed=0)
    saved = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(args.out / "runs" / name)  # read by report_to's callback when the Trainer is made
    try:
        trainer = MGSTrainer(
            model=model, args=targs, train_dataset=train, eval_dataset=test, data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=accuracy, mgs_alpha=alpha, mgs_max_samples=args.penalty_samples, callbacks=[monitor],
        )
        trainer.train()
    finally:
        if saved is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = saved
    history = [row["eval_accuracy"] for row in trainer.state.log_history if "eval_accuracy" in row]
    final_test = trainer.evaluate(test)["eval_accuracy"]
    noisy_fit = trainer.evaluate(noisy_train_eval)["eval_accuracy"]
    result = {
        "alpha": alpha, "seed": seed, "test_accuracy": final_test, "best_test_accuracy": max(history, default=final_test),
        "noisy_train_accuracy": noisy_fit, "final_trace": monitor.last_metrics["mgs/trace"] if monitor.last_metrics else None,
        "steps": trainer.state.global_step,
    }
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.001, 0.01, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", type=float, default=0.4, help="fraction of training labels flipped")
    parser.add_argument("--train", type=int, default=384)
    parser.add_argument("--test", type=int, default=512)
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (smoke tests)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--logging-steps", type=int, default=12)
    parser.add_argument("--penalty-samples", type=int, default=8, help="samples of each batch the penalty's K is taken on")
    parser.add_argument("--out", type=Path, default=Path("examples/hf_label_noise"))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    tokenizer = make_tokenizer()
    texts, labels = sentences(args.train, seed=100)
    flip = random.Random(101).sample(range(args.train), int(args.noise * args.train))
    noisy = [1 - y if i in set(flip) else y for i, y in enumerate(labels)]
    train = rows(tokenizer, texts, noisy)
    test = rows(tokenizer, *sentences(args.test, seed=200))
    results = [run(alpha, seed, args, tokenizer, train, train, test) for alpha in args.alphas for seed in args.seeds]

    print(f"\n{args.noise:.0%} of {args.train} training labels flipped; clean test set of {args.test}")
    print("| α | clean test acc. (final) | best over epochs | fit to the noisy train labels | tr K at the end |")
    print("|---|---|---|---|---|")
    for alpha in args.alphas:
        mine = [r for r in results if r["alpha"] == alpha]

        def summary(key):
            values = [r[key] for r in mine if r[key] is not None]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.3f}{spread}" if values else "n/a"

        print(f"| {alpha:g} | {summary('test_accuracy')} | {summary('best_test_accuracy')} | "
              f"{summary('noisy_train_accuracy')} | {summary('final_trace')} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
