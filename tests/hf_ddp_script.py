"""Run by tests/test_hf_trainer.py under ``torchrun --nproc_per_node 2`` (Trainer's accelerate backend, gloo): one optimiser step of
MGSTrainer with and without the penalty from the same weights, each process on its own batch (gloo).
Each process saves its batch, both runs' weights and the logged penalty to ``<out>/rank<r>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)

from hf_helpers import T, pad_collate, text_rows, tiny  # noqa: E402
from mgs_torch.hf import MGSTrainer  # noqa: E402

ALPHA = 0.4


class Recording(MGSTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.__dict__.setdefault("seen", []).append({k: v.detach().clone() for k, v in inputs.items()})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def run(out: Path, alpha: float):
    model = tiny("bert")
    args = T.TrainingArguments(
        output_dir=str(out / f"run{alpha}"), use_cpu=True, report_to="none", max_steps=1, logging_steps=1,
        per_device_train_batch_size=3, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0,
        save_strategy="no", disable_tqdm=True, seed=0, ddp_backend="gloo",
    )
    trainer = Recording(model=model, args=args, train_dataset=text_rows(12), data_collator=pad_collate, mgs_alpha=alpha)
    trainer.train()
    logged = [row["mgs/penalty"] for row in trainer.state.log_history if "mgs/penalty" in row]
    return trainer, {k: v.detach().clone() for k, v in model.named_parameters()}, logged


def main() -> None:
    out = Path(sys.argv[1])
    trainer, with_penalty, logged = run(out, ALPHA)
    _, without, _ = run(out, 0.0)
    torch.save(
        {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "seen": trainer.seen, "with": with_penalty,
         "without": without, "alpha": ALPHA, "logged_penalty": logged[0] if logged else None},
        out / f"rank{dist.get_rank()}.pt",
    )


if __name__ == "__main__":
    main()
