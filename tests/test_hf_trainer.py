"""``mgs_torch.hf`` inside ``transformers.Trainer`` (issue 21, item 3), on the CPU with a tiny BERT built from
its configuration, a few steps, offline:

* the penalty step equals a hand-written loop's (the loop's penalty from the plain autograd reference over
  each sample alone without its padding, never torch.func);
* under gradient accumulation the step's penalty is the mean over its micro-batches, whichever way
  Trainer scales the loss; under ``bf16`` it is computed in float32; across two processes (torchrun,
  Trainer's accelerate backend, gloo) it is the mean over the processes' batches;
* the callback's values land in ``trainer.state.log_history`` and in TensorBoard (``report_to``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_helpers import T, loop_jacobian, pad_collate, relative, text_rows, tiny, trace_penalty_gradient
from mgs_torch.hf import MGSTrainer, MGSTrainerCallback, MGSTrainerMixin

HERE = Path(__file__).resolve().parent
LR = 0.5


def make_args(tmp_path, **overrides) -> "T.TrainingArguments":
    options = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=2, logging_steps=1, per_device_train_batch_size=3,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no", disable_tqdm=True,
        seed=0,
    )
    options.update(overrides)
    return T.TrainingArguments(**options)


class Recording(MGSTrainer):
    """Keeps every training micro-batch Trainer hands to compute_loss (to replay it by hand)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.__dict__.setdefault("seen", []).append({k: v.detach().clone() for k, v in inputs.items()})
            self.__dict__.setdefault("wrapped_forward", []).append("forward" in model.__dict__)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def train(tmp_path, alpha: float, cls=Recording, dtype=torch.float64, callbacks=(), **overrides):
    model = tiny("bert", dtype=dtype)
    trainer = cls(model=model, args=make_args(tmp_path, **overrides), train_dataset=text_rows(12), data_collator=pad_collate,
                  mgs_alpha=alpha, callbacks=list(callbacks))
    trainer.train()
    return trainer, model


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def test_the_penalty_step_equals_a_hand_written_loop(tmp_path):
    alpha = 0.3
    reference = tiny("bert")  # the same initial weights
    trainer, model = train(tmp_path, alpha)
    assert len(trainer.seen) == 2
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    reference.train()
    for batch in trainer.seen:
        optimizer.zero_grad()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        J = loop_jacobian(reference, inputs, create_graph=True)  # each sample alone, padding removed
        penalty = (J**2).sum() / J.shape[0]  # tr K / (n·q)
        (reference(**batch).loss + alpha * penalty).backward()
        optimizer.step()
    assert relative(flat(model.parameters()), flat(reference.parameters())) <= 1e-12
    logged = [row["mgs/penalty"] for row in trainer.state.log_history if "mgs/penalty" in row]
    assert len(logged) == 2 and all(row["mgs/alpha"] == alpha for row in trainer.state.log_history if "mgs/penalty" in row)


@pytest.mark.parametrize("scaled", [None, False], ids=["trainer-default", "loss-divided-by-trainer"])
def test_gradient_accumulation_takes_the_mean_penalty_of_the_micro_batches(tmp_path, scaled):
    """One optimiser step over two micro-batches, with and without the penalty from the same weights: the
    difference is the penalty's step alone, −lr·α·½(∇g₁ + ∇g₂). BERT accepts loss kwargs, so by default Trainer
    does not divide its loss by the accumulation steps (the mixin divides the penalty); with
    loss_is_scaled_for_ga=False Trainer divides everything."""
    cls = type("Scaled", (Recording,), {"loss_is_scaled_for_ga": scaled})
    alpha = 0.4
    with_penalty, model = train(tmp_path / "a", alpha, cls=cls, max_steps=1, gradient_accumulation_steps=2)
    without, plain = train(tmp_path / "b", 0.0, cls=cls, max_steps=1, gradient_accumulation_steps=2)
    assert len(with_penalty.seen) == 2
    assert all(torch.equal(a[k], b[k]) for a, b in zip(with_penalty.seen, without.seen) for k in a)
    init = tiny("bert")
    grads = [flat(trace_penalty_gradient(init, batch)) for batch in with_penalty.seen]
    expected = -LR * alpha * (grads[0] + grads[1]) / 2
    assert relative(flat(model.parameters()) - flat(plain.parameters()), expected) <= 1e-9


def test_bf16_mixed_precision_computes_the_penalty_in_float32(tmp_path):
    alpha = 1.0
    try:
        trainer, model = train(tmp_path / "a", alpha, dtype=torch.float32, max_steps=1, bf16=True)
    except (ValueError, RuntimeError) as err:  # pragma: no cover - a build without CPU bf16 autocast
        pytest.skip(f"bf16 training is not available on this CPU build: {err}")
    without, plain = train(tmp_path / "b", 0.0, dtype=torch.float32, max_steps=1, bf16=True)
    assert trainer.wrapped_forward == [True]  # accelerate's autocast forward was in place: the mixin unwrapped it
    assert "forward" in model.__dict__  # and put it back
    assert trainer.mgs_last_penalty.dtype == torch.float32
    init = tiny("bert", dtype=torch.float32).double()  # the same float32 weights, computed in float64
    (batch,) = trainer.seen
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    J = loop_jacobian(init, inputs)
    # float32 rounding only (a bf16 kernel would be ~1e-2 off)
    assert relative(trainer.mgs_last_penalty.double(), (J**2).sum() / J.shape[0]) <= 1e-5
    expected = -LR * alpha * flat(trace_penalty_gradient(init, batch))
    assert relative((flat(model.parameters()) - flat(plain.parameters())).double(), expected) <= 1e-3


def test_two_processes_through_accelerate_average_their_penalties(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), str(HERE.parent), env.get("PYTHONPATH")) if p)
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        # torchrun: Trainer's accelerate backend sees LOCAL_RANK and trains the two processes with gloo (MULTI_CPU)
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(HERE / "hf_ddp_script.py"), str(tmp_path)],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"the two-process run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    (b0,), (b1,) = ranks[0]["seen"], ranks[1]["seen"]
    assert not torch.equal(b0["input_ids"][:, :2], b1["input_ids"][:, :2])  # each process trains on its own batch
    for key, value in ranks[0]["with"].items():
        assert torch.equal(value, ranks[1]["with"][key]), key  # DDP kept the processes in step
    init = tiny("bert")
    g0, g1 = flat(trace_penalty_gradient(init, b0)), flat(trace_penalty_gradient(init, b1))
    step = flat(ranks[0]["with"].values()) - flat(ranks[0]["without"].values())
    assert relative(step, -LR * ranks[0]["alpha"] * (g0 + g1) / 2) <= 1e-9
    # the logged penalty is the mean over the processes
    values = []
    for batch in (b0, b1):
        J = loop_jacobian(init, {k: v for k, v in batch.items() if k != "labels"})
        values.append(float((J**2).sum()) / J.shape[0])
    assert abs(ranks[0]["logged_penalty"] - sum(values) / 2) <= 1e-9 * sum(values)


def test_the_callback_logs_into_log_history_and_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # where report_to="tensorboard" writes
    model = tiny("bert")
    args = make_args(tmp_path, max_steps=4, logging_steps=2, report_to="tensorboard")
    trainer = T.Trainer(model=model, args=args, train_dataset=text_rows(12), data_collator=pad_collate)
    callback = MGSTrainerCallback(trainer, max_samples=3, metrics=("trace", "logdet", "rank"))
    trainer.add_callback(callback)
    trainer.train()
    rows = [row for row in trainer.state.log_history if "mgs/trace" in row]
    assert [row["step"] for row in rows] == [2, 4]
    assert [row["step"] for row in trainer.state.log_history if "loss" in row] == [2, 4]  # the Trainer's own rows too
    assert set(rows[-1]) >= {"mgs/trace", "mgs/logdet", "mgs/rank", "epoch", "step"}
    # the last value is tr K of the final weights on the probe batch (drawn from the training set, labels left out)
    probe = callback.probe_inputs
    assert set(probe) == {"input_ids", "attention_mask"} and probe["input_ids"].shape[0] == 3
    J = loop_jacobian(model.eval(), probe)
    assert relative(torch.tensor(rows[-1]["mgs/trace"], dtype=torch.float64), (J**2).sum()) <= 1e-10
    assert rows[-1]["mgs/rank"] == 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    traces = events.Scalars("train/mgs/trace")  # report_to's TensorBoard callback prefixes "train/"
    assert [e.step for e in traces] == [2, 4]
    assert abs(traces[-1].value - rows[-1]["mgs/trace"]) <= 1e-4 * rows[-1]["mgs/trace"]


def test_mgs_trainer_binds_its_callbacks_and_logs_by_epoch(tmp_path):
    callback = MGSTrainerCallback(probe={"input_ids": torch.tensor([[3, 4, 5], [6, 7, 0]]),
                                         "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]), "labels": torch.tensor([0, 1])})
    trainer, _ = train(tmp_path, 0.1, callbacks=[callback], max_steps=-1, num_train_epochs=2, per_device_train_batch_size=6,
                       logging_strategy="epoch")
    assert callback.trainer is trainer
    assert set(callback.probe_inputs) == {"input_ids", "attention_mask"}  # the label column is left out
    assert [row["step"] for row in trainer.state.log_history if "mgs/trace" in row] == [2, 4]
    assert [row["step"] for row in trainer.state.log_history if "mgs/penalty" in row] == [2, 4]


def test_configuration_errors(tmp_path):
    trainer = T.Trainer(model=tiny("bert"), args=make_args(tmp_path), train_dataset=text_rows(6), data_collator=pad_collate)
    trainer.add_callback(MGSTrainerCallback())
    with pytest.raises(ValueError, match=r"needs the Trainer it logs into.*MGSTrainerCallback\(trainer"):
        trainer.train()
    with pytest.raises(ValueError, match="metrics must be a non-empty selection"):
        MGSTrainerCallback(metrics=("trace", "nope"))
    with pytest.raises(ValueError, match="model_mode must be one of"):
        MGSTrainerCallback(model_mode="test")
    with pytest.raises(TypeError, match="logits="):
        MGSTrainerCallback(logits=1.5)
    with pytest.raises(ValueError, match="mgs_alpha must be a finite number >= 0.0"):
        MGSTrainer(model=tiny("bert"), args=make_args(tmp_path), mgs_alpha=-1.0)
    with pytest.raises(ValueError, match="kind"):
        MGSTrainer(model=tiny("bert"), args=make_args(tmp_path), mgs_kind="frobenius")

    class NotATrainer(MGSTrainerMixin):
        pass

    with pytest.raises(TypeError, match="is for transformers.Trainer"):
        NotATrainer()
