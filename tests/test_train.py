"""Trainer semantics: loss normalisation, accumulation, schedule, resume, divergence."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pickle
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DAMAGES, damage, make_checkpoint

from minimind_train.chat import IGNORE_INDEX
from minimind_train.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    TrainState,
    WeightMismatchError,
    checkpoint_problem,
    init_state,
    load_minimind_weights,
    load_train_state,
    model_from_checkpoint,
    save_checkpoint,
)
from minimind_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from minimind_train.data import DEMO_DATA_PATH, SFTData, prepare_data
from minimind_train.train import (
    NonFiniteLossError,
    TrainingDiverged,
    backward_window,
    check_divergence,
    clip_grad_norm,
    evaluation_steps,
    lr_at,
    steps_per_epoch,
    train_epochs,
)

TINY = ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture
def run_cfg(tmp_path: Path) -> RunConfig:
    """A tiny model on the first 64 bundled demo conversations."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(DEMO_DATA_PATH.read_text(encoding="utf-8").splitlines(keepends=True)[:64]),
                    encoding="utf-8")
    return RunConfig(
        model=TINY,
        data=DataConfig(train_path=str(path), val_fraction=0.25, max_seq_len=64,
                        cache_dir=str(tmp_path / "cache")),
        train=TrainConfig(epochs=2, batch_size=8, learning_rate=3e-3, device="cpu", dtype="float32",
                          seed=7, eval_batch_size=16),
    )


@pytest.fixture
def data(run_cfg: RunConfig, tok) -> SFTData:
    return prepare_data(run_cfg.data, tok)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_batch8_accum1_equals_batch2_accum4(data, run_cfg):
    state = init_state(run_cfg, vocab_size=data.vocab_size, device=torch.device("cpu"))
    backward_window(state, [data.train.batch(range(8), data.pad_id)])
    big = _grads(state.model)
    state.model.zero_grad(set_to_none=True)
    backward_window(state, [data.train.batch([i, i + 1], data.pad_id) for i in range(0, 8, 2)])
    small = _grads(state.model)
    assert big.keys() == small.keys() and big
    for name in big:
        torch.testing.assert_close(small[name], big[name], atol=1e-5, rtol=1e-4, msg=name)


def test_loss_is_next_token_ce_over_supervised_tokens(data, run_cfg):
    x, y = data.train.batch(range(4), data.pad_id)
    state = init_state(run_cfg, vocab_size=data.vocab_size, device=torch.device("cpu"))
    state.model.eval()
    ce, _, n = backward_window(state, [(x, y)])
    logits = state.model(input_ids=x).logits.detach()
    # By hand: position t predicts token t+1, counted only where label t+1 is supervised.
    total, count = 0.0, 0
    for b in range(x.shape[0]):
        for t in range(x.shape[1] - 1):
            if y[b, t + 1] != IGNORE_INDEX:
                total += float(F.cross_entropy(logits[b, t][None], y[b, t + 1][None]))
                count += 1
    assert n == count
    assert math.isclose(float(ce) / n, total / count, rel_tol=1e-5)
    # A second shift (the seed's bug) would give a different number.
    shifted_twice = F.cross_entropy(logits[:, :-2].reshape(-1, logits.shape[-1]), y[:, 2:].reshape(-1),
                                    ignore_index=IGNORE_INDEX)
    assert not math.isclose(float(shifted_twice), total / count, rel_tol=1e-3)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3, math.inf])
def test_clip_grad_norm_equals_torch(data, run_cfg, max_norm):
    """Skipping the rescale when its factor is 1 changes nothing: same norm, bit-identical gradients."""
    state = init_state(run_cfg, vocab_size=data.vocab_size, device=torch.device("cpu"))
    backward_window(state, [data.train.batch(range(4), data.pad_id)])
    params = list(state.model.parameters())
    grads = {n: p.grad.clone() for n, p in state.model.named_parameters()}
    ours = clip_grad_norm(params, max_norm)
    ours_grads = {n: p.grad.clone() for n, p in state.model.named_parameters()}
    for n, p in state.model.named_parameters():
        p.grad = grads[n].clone()
    ref = torch.nn.utils.clip_grad_norm_(params, max_norm)
    assert torch.equal(ours, ref)
    for n, p in state.model.named_parameters():
        assert torch.equal(ours_grads[n], p.grad), n


def test_cpu_optimizer_is_fused_adamw(run_cfg):
    state = init_state(run_cfg, vocab_size=300, device=torch.device("cpu"))
    assert isinstance(state.optimizer, torch.optim.AdamW) and state.optimizer.defaults["fused"]


@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedule_endpoints(warmup):
    total, lr, ratio = 20, 1e-3, 0.1
    lrs = [lr_at(s, total, lr, ratio, warmup) for s in range(total)]
    assert lrs[warmup] == pytest.approx(lr, rel=1e-12)
    assert lrs[-1] == pytest.approx(lr * ratio, rel=1e-12)
    assert all(a < b for a, b in itertools.pairwise(lrs[:warmup + 1]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[warmup:]))
    with pytest.raises(ValueError):
        lr_at(total, total, lr, ratio, warmup)


def test_partial_accumulation_window_still_steps():
    t = TrainConfig(accumulation_steps=4)
    assert steps_per_epoch(9, t) == 3
    assert steps_per_epoch(9, dataclasses.replace(t, max_steps_per_epoch=2)) == 2


def test_every_parameter_changes_after_one_step(run_cfg):
    cfg = dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, epochs=1,
                                                                 max_steps_per_epoch=1))
    data = prepare_data(cfg.data)
    state = init_state(cfg, vocab_size=data.vocab_size)
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    next(train_epochs(cfg, data, state))
    unchanged = [n for n, p in state.model.named_parameters() if torch.equal(before[n], p)]
    assert not unchanged


def test_validation_loss_falls_and_metrics_reported(run_cfg):
    cfg = dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, epochs=3))
    data = prepare_data(cfg.data)
    results = [r.metrics for r in train_epochs(cfg, data)]
    assert results[-1]["val_loss"] < results[0]["val_loss"]
    for key in ("train_loss", "val_loss", "aux_loss", "lr", "grad_norm", "supervised_tokens_per_s",
                "tokens_per_s", "epoch_seconds", "peak_memory_mb", "time_epoch_start_unix"):
        assert all(math.isfinite(m[key]) for m in results), key
    starts = [m["time_epoch_start_unix"] for m in results]
    assert starts == sorted(starts) and abs(starts[0] - time.time()) < 600
    assert results[-1]["lr"] == pytest.approx(cfg.train.learning_rate * cfg.train.min_lr_ratio)


def test_resume_continues_exactly(run_cfg, tmp_path):
    cfg = dataclasses.replace(run_cfg, model=dataclasses.replace(TINY, dropout=0.1),
                              train=dataclasses.replace(run_cfg.train, epochs=3))
    data = prepare_data(cfg.data)
    straight = [r.metrics["train_loss"] for r in train_epochs(cfg, data)]

    gen = train_epochs(cfg, data)
    first = next(gen)
    save_checkpoint(tmp_path / "ckpt", first.state, cfg, first.metrics)
    gen.close()
    torch.manual_seed(12345)  # a resumed process has some other RNG state; the checkpoint restores it
    state = load_train_state(tmp_path / "ckpt", cfg, data.vocab_size)
    resumed = [r.metrics["train_loss"] for r in train_epochs(cfg, data, state)]
    assert resumed == pytest.approx(straight[1:], rel=0, abs=1e-6)


def test_checkpoint_layout_and_strict_reload(run_cfg, tmp_path):
    data = prepare_data(run_cfg.data)
    state = init_state(run_cfg, vocab_size=data.vocab_size)
    folder = save_checkpoint(tmp_path / "ck" / "c", state, run_cfg, {"val_loss": 1.0})
    assert {p.name for p in folder.iterdir()} == {MODEL_FILE, STATE_FILE, "meta.json"}
    fp16 = torch.load(folder / MODEL_FILE, weights_only=True)
    assert all(v.dtype == torch.float16 for v in fp16.values())
    assert "lm_head.weight" in fp16 and "model.embed_tokens.weight" in fp16
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["metrics"]["val_loss"] == 1.0 and meta["config"]["model"]["hidden_size"] == 64
    other = init_state(run_cfg, vocab_size=data.vocab_size).model
    load_minimind_weights(other, folder / MODEL_FILE)
    # No temp folders are left behind by the atomic write.
    save_checkpoint(folder, state, run_cfg, {"val_loss": 0.5})  # overwrite in place
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["c"]
    assert json.loads((folder / "meta.json").read_text())["metrics"]["val_loss"] == 0.5


def test_a_checkpoint_loads_from_its_model_pth_or_its_folder(run_cfg, tmp_path):
    # A study prints .../epoch_000e/model.pth; the folder was the only form that loaded (issue 19).
    data = prepare_data(run_cfg.data)
    state = init_state(run_cfg, vocab_size=data.vocab_size)
    folder = save_checkpoint(tmp_path / "epoch_0001", state, run_cfg, {"val_loss": 1.0})
    expected = {k: v.half().float() for k, v in state.model.state_dict().items()}
    for path in (folder, folder / MODEL_FILE, str(folder / MODEL_FILE)):
        loaded = model_from_checkpoint(path, run_cfg, data.vocab_size).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items()), path
        cfg = dataclasses.replace(run_cfg, model=dataclasses.replace(run_cfg.model, init_from=str(path)))
        loaded = init_state(cfg, vocab_size=data.vocab_size).model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items()), path
    for missing in (tmp_path / "nowhere.pth", tmp_path / "empty_folder"):
        (tmp_path / "empty_folder").mkdir(exist_ok=True)
        with pytest.raises(FileNotFoundError, match=r"no such weights file: .*(nowhere|empty_folder/model)\.pth"):
            model_from_checkpoint(missing, run_cfg, data.vocab_size)


@pytest.mark.parametrize("form", sorted(DAMAGES))
def test_the_checkpoint_validity_rule_names_each_damage(tmp_path, form):
    # One rule decides which checkpoint a trial continues from (issue 21: a deleted train_state.pt was
    # announced as the resume point while the trial silently trained from an older one).
    folder = make_checkpoint(tmp_path / "epoch_0002", 2, 1.0)
    assert checkpoint_problem(folder, resume=True) is None
    words = damage(folder, form)
    problem = checkpoint_problem(folder, resume=True)
    assert problem is not None and problem.startswith(words), problem
    # The weights alone stay usable where only the resume state was pruned (deleted), not damaged.
    assert (checkpoint_problem(folder, resume=False) is None) == (form == "state-missing")


def test_init_from_mismatch_lists_keys(run_cfg, tmp_path):
    data = prepare_data(run_cfg.data)
    state = init_state(run_cfg, vocab_size=data.vocab_size)
    sd = {k: v.half() for k, v in state.model.state_dict().items()}
    sd.pop("model.norm.weight")
    sd["model.extra.weight"] = torch.zeros(2)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightMismatchError) as info:
        load_minimind_weights(state.model, tmp_path / "bad.pth")
    msg = str(info.value)
    assert "missing (1): model.norm.weight" in msg
    assert "unexpected (1): model.extra.weight" in msg
    assert "model.layers.0.mlp.up_proj.weight: file (3, 3)" in msg


def test_non_finite_loss_raises_distinct_error(run_cfg):
    data = prepare_data(run_cfg.data)
    state = init_state(run_cfg, vocab_size=data.vocab_size)
    with torch.no_grad():  # an overflowed weight, as a too-large learning rate leaves behind
        state.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError) as info:
        next(train_epochs(run_cfg, data, state))
    assert info.value.epoch == 1 and info.value.step == 0
    assert "non-finite training loss" in str(info.value)
    copy = pickle.loads(pickle.dumps(info.value))  # Ray ships trial errors pickled
    assert (copy.epoch, copy.step, str(copy)) == (1, 0, str(info.value))


@pytest.mark.parametrize(("first", "loss", "grad", "words"), [
    (8.7, 90.0, 1.0, "loss 90 exploded above 10 x the first step's 8.7"),
    (8.7, 9.0, 2e6, "gradient norm 2e+06 exploded above 1e+06"),
    (8.7, float("nan"), 1.0, "non-finite"),
    (8.7, 5.0, float("inf"), "non-finite"),
])
def test_divergence_thresholds(first, loss, grad, words):
    cfg = TrainConfig()
    with pytest.raises(TrainingDiverged, match=re.escape(words)) as info:
        check_divergence(cfg, first, loss, grad, epoch=2, step=5)
    copy = pickle.loads(pickle.dumps(info.value))  # Ray ships trial errors pickled
    assert (type(copy), str(copy)) == (type(info.value), str(info.value))
    assert str(info.value).endswith("at epoch 2, optimizer step 5")


def test_divergence_checks_can_be_turned_off_and_healthy_steps_pass():
    check_divergence(TrainConfig(), 8.7, 80.0, 1e5, epoch=1, step=1)  # below both thresholds
    off = TrainConfig(divergence_loss_factor=0, divergence_grad_norm=0)
    check_divergence(off, 8.7, 1e9, 1e12, epoch=1, step=1)
    with pytest.raises(NonFiniteLossError):
        check_divergence(off, 8.7, float("inf"), 1.0, epoch=1, step=1)  # never off
    with pytest.raises(Exception, match="divergence_loss_factor=0.5"):
        TrainConfig(divergence_loss_factor=0.5)


def test_a_learning_rate_blowup_is_diverged_not_completed(run_cfg):
    """The shared case lr-blowup: lr in the hundreds sends the loss to ~1e6 while it stays finite."""
    cfg = dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, learning_rate=300.0,
                                                                 grad_clip=0.0))
    data = prepare_data(cfg.data)
    with pytest.raises(TrainingDiverged) as info:
        for _ in train_epochs(cfg, data):
            pass
    assert info.value.epoch == 1, str(info.value)


def test_first_loss_survives_a_checkpoint(run_cfg, tmp_path):
    data = prepare_data(run_cfg.data)
    result = next(train_epochs(run_cfg, data))
    assert result.state.first_loss is not None and math.isfinite(result.state.first_loss)
    save_checkpoint(tmp_path / "c", result.state, run_cfg, result.metrics)
    state = load_train_state(tmp_path / "c", run_cfg, data.vocab_size)
    assert state.first_loss == result.state.first_loss


@pytest.mark.parametrize(("per_epoch", "n", "expected"), [
    (10, 1, [10]), (10, 4, [3, 5, 8, 10]), (6, 3, [2, 4, 6]), (7, 7, list(range(1, 8))),
    (3, 5, [1, 2, 3]),  # fewer steps than evaluations: one after every step
])
def test_evaluation_steps_are_evenly_spaced_and_end_the_epoch(per_epoch, n, expected):
    steps = evaluation_steps(per_epoch, n)
    assert steps == expected and steps[-1] == per_epoch and len(steps) == min(n, per_epoch)
    gaps = [b - a for a, b in itertools.pairwise([0, *steps])]
    assert max(gaps) - min(gaps) <= 1
    with pytest.raises(ValueError, match="evals_per_epoch=0"):
        evaluation_steps(per_epoch, 0)


_TIMING = ("epoch_seconds", "val_seconds", "supervised_tokens_per_s", "tokens_per_s", "peak_memory_mb",
           "time_epoch_start_unix")


def _untimed(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in _TIMING}


def _evals_cfg(run_cfg: RunConfig, n: int) -> RunConfig:
    # 6 optimizer steps of 4 samples per epoch (of 12 batches: small and fast); dropout, so the RNG
    # must travel in a checkpoint too.
    return dataclasses.replace(run_cfg, model=dataclasses.replace(TINY, dropout=0.1),
                               train=dataclasses.replace(run_cfg.train, evals_per_epoch=n, batch_size=4,
                                                         max_steps_per_epoch=6))


def test_evaluations_inside_an_epoch_and_a_resume_from_one_are_bit_exact(run_cfg, tmp_path):
    """3 evaluations per epoch report at steps 2, 4, 6 and change nothing in training; a state saved at
    an intermediate evaluation (mid-epoch 1, and mid-epoch 2 after an epoch end) and resumed in a fresh
    RNG ends bit-identical to an uninterrupted run, with the same metrics at every later evaluation."""
    once, thrice = _evals_cfg(run_cfg, 1), _evals_cfg(run_cfg, 3)
    data = prepare_data(once.data)
    runs = list(train_epochs(once, data))
    want = runs[-1].state  # uninterrupted, with no evaluation inside an epoch
    by_epoch = [(r.epoch, r.evaluation, r.optimizer_steps, r.epoch_end, r.metrics) for r in runs]
    results = []
    for r in train_epochs(thrice, data):
        results.append(r)
        if r.evaluation in (2, 5):
            save_checkpoint(tmp_path / f"eval{r.evaluation}", r.state, thrice, r.metrics)
    assert [(r.epoch, r.evaluation, r.optimizer_steps, r.step_in_epoch, r.epoch_end) for r in results] == [
        (1, 1, 2, 2, False), (1, 2, 4, 4, False), (1, 3, 6, 6, True),
        (2, 4, 8, 2, False), (2, 5, 10, 4, False), (2, 6, 12, 6, True)]
    assert [row[:4] for row in by_epoch] == [(1, 1, 6, True), (2, 2, 12, True)]
    # (the run's first evaluation also carries what the untrained model scored: baseline_* and uniform_loss)
    assert all(r.metrics.keys() == by_epoch[i][4].keys() for i, r in ((0, results[0]), (1, results[1])))
    assert all(r.metrics["optimizer_steps"] == r.optimizer_steps for r in results)
    ends = [r.metrics for r in results if r.epoch_end]
    assert [m["val_loss"] for m in ends] == [row[4]["val_loss"] for row in by_epoch]
    assert [m["lr"] for m in ends] == [row[4]["lr"] for row in by_epoch]
    # Training metrics cover the interval since the previous evaluation (2 steps), not the epoch.
    assert ends[0]["train_loss"] != by_epoch[0][4]["train_loss"]

    def assert_same_state(state: TrainState) -> None:
        for (name, a), b in zip(state.model.named_parameters(), want.model.parameters()):
            assert torch.equal(a, b), name
        for a, b in zip(state.optimizer.state.values(), want.optimizer.state.values()):
            assert all(torch.equal(a[k], b[k]) for k in a)

    assert_same_state(results[-1].state)
    for stop in (2, 5):
        torch.manual_seed(12345)  # a resumed process has some other RNG state; the checkpoint restores it
        state = load_train_state(tmp_path / f"eval{stop}", thrice, data.vocab_size)
        resumed = list(train_epochs(thrice, data, state))
        assert [(r.epoch, r.evaluation, r.optimizer_steps, _untimed(r.metrics)) for r in resumed] == \
            [(r.epoch, r.evaluation, r.optimizer_steps, _untimed(r.metrics)) for r in results[stop:]]
        assert_same_state(resumed[-1].state)


def test_a_state_that_does_not_fit_the_epoch_is_refused(run_cfg):
    data = prepare_data(run_cfg.data)
    state = init_state(run_cfg, vocab_size=data.vocab_size)
    state.step = 7  # 6 steps per epoch: step 7 is not in epoch 0
    with pytest.raises(ValueError, match=r"epoch 0, optimizer step 7\) does not fit 6 optimizer steps"):
        next(train_epochs(run_cfg, data, state))
def test_the_model_before_training_is_measured_once_and_reported_with_the_first_epoch(run_cfg, tmp_path):
    """What a run must beat to have learned anything (tune.study.no_better_reason): the validation loss
    before the first step and ln(vocabulary size), with a fresh run's first epoch only; training is unchanged
    by the measurement (a resumed run, which does not measure, continues exactly)."""
    from minimind_train.train import evaluate

    data = prepare_data(run_cfg.data)
    fresh = init_state(run_cfg, data.vocab_size)
    before = evaluate(fresh, data.val, run_cfg.train.eval_batch_size, data.pad_id)
    gen = train_epochs(run_cfg, data)
    first = next(gen)
    assert first.metrics["baseline_val_loss"] == pytest.approx(before, abs=1e-6)
    assert first.metrics["uniform_loss"] == pytest.approx(math.log(data.vocab_size))
    assert first.metrics["baseline_train_loss"] == first.state.first_loss
    assert first.metrics["val_loss"] < before
    save_checkpoint(tmp_path / "c", first.state, run_cfg, first.metrics)
    second = next(gen)
    resumed = next(train_epochs(run_cfg, data, load_train_state(tmp_path / "c", run_cfg, data.vocab_size)))
    assert not any(k.startswith("baseline_") or k == "uniform_loss" for k in {*second.metrics, *resumed.metrics})
    assert resumed.metrics["train_loss"] == pytest.approx(second.metrics["train_loss"], abs=1e-6)
