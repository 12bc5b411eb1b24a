"""Cost of the Hugging Face path, measured side by side in one process (medians of repeated calls).

1. **Padded BERT**: the per-sample route a padded batch with its attention mask now takes, against the
   whole-batch route it fell to before issue 21 (reproduced by switching off mgs_torch's fix of
   transformers' mask helpers), for K and for a training step with the trace penalty; CPU peak memory beside.
2. **Trainer**: ``Trainer.training_step`` (forward, loss, backward) plain, with ``MGSTrainer``'s penalty (exact
   trace; Hutchinson with one probe), and a hand-written step ``loss + α·mgs_penalty(model, batch)``.
3. **Causal LM**: tr K of all T·V logits against the scalable definitions of ``mgs_torch.hf.language``.

    OMP_NUM_THREADS=1 python benchmarks/bench_hf.py                  # prints the tables
    OMP_NUM_THREADS=1 python benchmarks/bench_hf.py --repeats 3 --json bench-hf.json

Models are random, built from configurations (nothing downloaded); sizes are printed with the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformers as T  # noqa: E402

from bench_mgs import median_ms, peak_memory_mb  # noqa: E402
from mgs_torch import mgs_kernel, mgs_penalty, mgs_trace  # noqa: E402
from mgs_torch.hf import MGSTrainer, next_token_logits  # noqa: E402
import mgs_torch.hf._masks as masks  # noqa: E402

T.logging.set_verbosity_error()
ALPHA = 1e-3


@contextlib.contextmanager
def whole_batch_route():
    """mgs_torch as before issue 21: transformers' mask helpers read the padding mask under vmap, vmap refuses,
    and mgs_torch differentiates the whole-batch function."""
    saved = masks.masks_built_under_transforms
    masks.masks_built_under_transforms = contextlib.nullcontext
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its one-time "whole-batch" warning
            yield
    finally:
        masks.masks_built_under_transforms = saved


def padded_batch(n: int, width: int, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(width // 4, width + 1, (n,), generator=g)
    lengths[0] = width
    ids = torch.randint(2, vocab, (n, width), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=g)}


def bert(hidden: int, vocab: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return T.BertForSequenceClassification(T.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
        max_position_embeddings=width, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def measure(rows: list, section: str, name: str, fn: Callable[[], object], repeats: int, prepare=lambda: None,
            baseline: str | None = None, memory: bool = False) -> None:
    prepare()
    ms = median_ms(fn, repeats, torch.device("cpu"))
    peak = peak_memory_mb(fn, torch.device("cpu"), prepare) if memory else None
    rows.append({"section": section, "method": name, "median_ms": ms, "peak_mb": peak, "baseline": baseline or name})
    shown = f"{ms:10.1f} ms" + (f"   peak {peak:7.1f} MB" if peak is not None else "")
    print(f"  {name:58s}{shown}", flush=True)


def padded_bert(rows: list, args) -> None:
    print(f"\n1. padded BERT (hidden {args.hidden}, 2 layers, vocabulary {args.vocab}), n = {args.batch}, "
          f"width {args.width}, q = 2, float32", flush=True)
    batch = padded_batch(args.batch, args.width, args.vocab)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    per_sample, whole = bert(args.hidden, args.vocab, args.width).eval(), bert(args.hidden, args.vocab, args.width).eval()

    def step(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-9)

        def run():
            opt.zero_grad(set_to_none=True)
            (model(**batch).loss + ALPHA * mgs_penalty(model, inputs)).backward()
            opt.step()
        return run

    def free(model):
        return lambda: model.zero_grad(set_to_none=True)

    section = "padded BERT"
    measure(rows, section, "K, per-sample route (now)", lambda: mgs_kernel(per_sample, inputs), args.repeats, memory=True)
    with whole_batch_route():
        measure(rows, section, "K, whole-batch route (before)", lambda: mgs_kernel(whole, inputs), args.repeats,
                baseline="K, per-sample route (now)", memory=True)
    measure(rows, section, "plain step", lambda: _plain(per_sample, batch), args.repeats,
            prepare=free(per_sample), memory=True)
    measure(rows, section, "trace penalty step, per-sample route (now)", step(per_sample), args.repeats,
            prepare=free(per_sample), baseline="plain step", memory=True)
    with whole_batch_route():
        measure(rows, section, "trace penalty step, whole-batch route (before)", step(whole), args.repeats,
                prepare=free(whole), baseline="trace penalty step, per-sample route (now)", memory=True)


def _plain(model, batch) -> None:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()


def trainer_steps(rows: list, args) -> None:
    print(f"\n2. Trainer.training_step on the same padded BERT batch (n = {args.batch})", flush=True)
    batch = padded_batch(args.batch, args.width, args.vocab)
    out = tempfile.mkdtemp()

    def make(cls, **mgs):
        targs = T.TrainingArguments(output_dir=out, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
        trainer = cls(model=bert(args.hidden, args.vocab, args.width), args=targs, **mgs)
        trainer.current_gradient_accumulation_steps = 1  # what the training loop sets before each step
        trainer.model.train()
        return trainer

    section = "Trainer"
    plain = make(T.Trainer)
    exact = make(MGSTrainer, mgs_alpha=ALPHA)
    hutchinson = make(MGSTrainer, mgs_alpha=ALPHA, mgs_estimator="hutchinson", mgs_num_probes=1)
    by_hand = bert(args.hidden, args.vocab, args.width).train()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def hand_step():
        by_hand.zero_grad(set_to_none=True)
        (by_hand(**batch).loss + ALPHA * mgs_penalty(by_hand, inputs)).backward()

    for name, trainer in (("Trainer.training_step (plain)", plain), ("MGSTrainer.training_step (exact trace)", exact),
                          ("MGSTrainer.training_step (Hutchinson, 1 probe)", hutchinson)):
        model = trainer.model
        measure(rows, section, name, lambda t=trainer, m=model: t.training_step(m, dict(batch)), args.repeats,
                prepare=lambda m=model: m.zero_grad(set_to_none=True), baseline="Trainer.training_step (plain)")
    measure(rows, section, "hand-written step: loss + α·mgs_penalty", hand_step, args.repeats,
            prepare=lambda: by_hand.zero_grad(set_to_none=True), baseline="Trainer.training_step (plain)")


def causal_lm(rows: list, args) -> None:
    n, width, vocab = 4, 16, args.lm_vocab
    print(f"\n3. GPT-2 causal LM (n_embd 32, 2 layers, vocabulary {vocab}), n = {n}, T = {width}: "
          f"tr K of q = T·V = {width * vocab} logits per sample against the scalable definitions", flush=True)
    torch.manual_seed(0)
    lm = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=width, pad_token_id=0,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    batch = {k: v for k, v in padded_batch(n, width, vocab).items() if k != "labels"}
    section = "causal LM"
    full = "tr K, all T·V logits (exact)"
    measure(rows, section, full, lambda: mgs_trace(lm, batch), max(1, args.repeats // 2))
    measure(rows, section, "tr K, next_token_logits (exact, q = T−1)", lambda: mgs_trace(lm, batch, logits=next_token_logits()),
            args.repeats, baseline=full)
    measure(rows, section, "K, next_token_logits (n·(T−1))²", lambda: mgs_kernel(lm, batch, logits=next_token_logits()),
            args.repeats, baseline=full)
    measure(rows, section, "tr K estimate, Hutchinson over T·V, 4 probes", lambda: mgs_trace(
        lm, batch, estimator="hutchinson", num_probes=4), args.repeats, baseline=full)


def table(rows: list) -> str:
    by_name = {(r["section"], r["method"]): r for r in rows}
    lines = ["| section | method | median ms | × baseline | baseline | peak MB |", "|---|---|---:|---:|---|---:|"]
    for r in rows:
        base = by_name[(r["section"], r["baseline"])]
        ratio = r["median_ms"] / base["median_ms"]
        peak = f"{r['peak_mb']:.1f}" if r["peak_mb"] is not None else ""
        lines.append(f"| {r['section']} | {r['method']} | {r['median_ms']:.1f} | {ratio:.3g} | "
                     f"{r['baseline'] if r['baseline'] != r['method'] else ''} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--lm-vocab", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sections", default="bert,trainer,lm", help="comma-separated: bert, trainer, lm")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"torch {torch.__version__}, transformers {T.__version__}, {torch.get_num_threads()} thread(s), CPU")
    rows: list = []
    sections = set(args.sections.split(","))
    if "bert" in sections:
        padded_bert(rows, args)
    if "trainer" in sections:
        trainer_steps(rows, args)
    if "lm" in sections:
        causal_lm(rows, args)
    print("\n" + table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "transformers": T.__version__,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
