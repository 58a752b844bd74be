"""MiniMind2 model: upstream compatibility (fixtures), losses, MoE routing, generation, dtypes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minimind_train.causal_lm import supervised_positions, token_cross_entropy
from minimind_train.chat import IGNORE_INDEX
from minimind_train.config import ConfigError, ModelConfig
from minimind_train.hf import MiniMindHFConfig, MiniMindHFForCausalLM, from_hf, to_hf
from minimind_train.model import (
    Attention,
    MiniMindForCausalLM,
    MOEFeedForward,
    count_parameters,
    default_intermediate_size,
    model_config_from,
)

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 128}


def tiny_model(seed: int = 0, std: float = 0.02, flash_attn: bool = True,
               **overrides: object) -> MiniMindForCausalLM:
    """A small random model; a larger ``std`` gives peaked, non-repetitive greedy continuations.
    ``flash_attn`` False: upstream's explicit softmax attention instead of SDPA."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(ModelConfig(**{**TINY, **overrides}))
    for module in model.modules():
        if isinstance(module, Attention):
            module.flash = flash_attn
    if std != 0.02:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.endswith("layernorm.weight") and not name.endswith("norm.weight"):
                    p.normal_(0.0, std)
    return model


def load_reference(fixture_dir: Path, name: str) -> tuple[MiniMindForCausalLM, dict]:
    ref = json.loads((fixture_dir / f"{name}.reference.json").read_text())
    config = ModelConfig(**{k: v for k, v in ref["config"].items() if v is not None})
    model = MiniMindForCausalLM(config)
    state = torch.load(fixture_dir / f"{name}.pth", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.float().eval(), ref


# --- upstream compatibility ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_state_dict_keys_match_upstream(fixture_dir: Path, name: str) -> None:
    ref = json.loads((fixture_dir / f"{name}.reference.json").read_text())
    model = MiniMindForCausalLM(ModelConfig(**{k: v for k, v in ref["config"].items() if v is not None}))
    upstream = torch.load(fixture_dir / f"{name}.pth", weights_only=True)
    ours = model.state_dict()
    assert set(ours) == set(upstream)
    assert all(ours[k].shape == upstream[k].shape for k in ours)
    assert count_parameters(model) == ref["params"]


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_reproduces_upstream_reference(fixture_dir: Path, name: str) -> None:
    model, ref = load_reference(fixture_dir, name)
    x = torch.tensor(ref["input_ids"])
    y = torch.tensor(ref["targets"])
    mask = torch.tensor(ref["loss_mask"], dtype=torch.float32)
    with torch.no_grad():
        out = model(x)
    logits = out.logits
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    masked = (ce * mask.reshape(-1)).sum() / mask.sum()
    assert masked.item() == pytest.approx(ref["masked_loss_eval"], abs=1e-4)
    for (b, t), values in zip(ref["logits_sample"]["positions"], ref["logits_sample"]["values"]):
        torch.testing.assert_close(logits[b, t, :16], torch.tensor(values), atol=1e-4, rtol=0)
    assert logits.abs().sum().item() == pytest.approx(ref["logits_sum_abs"], rel=1e-5)
    assert torch.equal(logits.argmax(-1), torch.tensor(ref["argmax"]))
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() == 0.0  # eval mode: no balance loss

    model.train()  # dropout is 0 in these configs; train mode only switches the MoE aux loss on
    with torch.no_grad():
        aux = model(x).aux_loss
    assert aux.item() == pytest.approx(ref["aux_loss_train_mode"], abs=1e-4)


def test_hf_label_convention_matches_upstream_shifted_loss(fixture_dir: Path) -> None:
    """Upstream's shifted (X, Y, mask) and our unshifted labels are the same loss."""
    model, ref = load_reference(fixture_dir, "tiny_dense")
    x, y = torch.tensor(ref["input_ids"]), torch.tensor(ref["targets"])
    mask = torch.tensor(ref["loss_mask"]).bool()
    input_ids = torch.cat([x, y[:, -1:]], dim=1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, 1:] = torch.where(mask, y, IGNORE_INDEX)
    with torch.no_grad():
        out = model(input_ids, labels=labels)
    assert out.loss.item() == pytest.approx(ref["masked_loss_eval"], abs=1e-4)
    ce_sum, n = token_cross_entropy(out.logits, labels)
    assert n.item() == int(mask.sum())
    assert (ce_sum / n).item() == pytest.approx(ref["masked_loss_eval"], abs=1e-4)


# --- losses ---------------------------------------------------------------------------------------------

def test_token_cross_entropy_shift_and_ignore() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 7, 1], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 10]])
    ce_sum, n = token_cross_entropy(logits, labels)
    assert ce_sum.dtype == torch.float32 and n.item() == 4
    expected = sum(F.cross_entropy(logits[b, t - 1].float()[None], labels[b, t][None])
                   for b, t in [(0, 1), (0, 3), (0, 4), (1, 4)])
    torch.testing.assert_close(ce_sum, expected)


def test_loss_with_nothing_supervised_is_zero_not_nan() -> None:
    model = tiny_model()
    ids = torch.randint(3, 128, (2, 6))
    out = model(ids, labels=torch.full_like(ids, IGNORE_INDEX))
    assert out.loss.item() == 0.0


def test_loss_rejects_truncated_logits() -> None:
    model = tiny_model()
    ids = torch.randint(3, 128, (1, 6))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


def _sft_labels(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """SFT-like labels: supervised spans, prompt and right padding ignored, one row all ignored."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.5, ids, IGNORE_INDEX)
    labels[1, -3:] = IGNORE_INDEX  # padding
    labels[2] = IGNORE_INDEX  # nothing supervised in this row
    return labels


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_moe", [False, True])
def test_selected_positions_head_equals_full_head(use_moe: bool) -> None:
    """The LM head at supervised positions only: same CE sum, count, aux loss and gradients."""
    model = tiny_model(std=0.3, use_moe=use_moe)
    ids = torch.randint(3, 128, (3, 11))
    labels = _sft_labels(ids, seed=1)
    out = model(ids)
    full, n_full = token_cross_entropy(out.logits, labels)
    (full / n_full + out.aux_loss).backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    ce, n, aux = model.supervised_cross_entropy(ids, labels)
    (ce / n + aux).backward()
    got = _grads(model)
    assert n == int(n_full) > 0
    torch.testing.assert_close(ce, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux, out.aux_loss, atol=1e-6, rtol=1e-6)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_supervised_positions_index_the_flat_hidden_states() -> None:
    labels = torch.tensor([[IGNORE_INDEX, 5, IGNORE_INDEX, 7], [IGNORE_INDEX, IGNORE_INDEX, 9, IGNORE_INDEX]])
    positions, targets = supervised_positions(labels)
    # Position (b, t) predicts labels[b, t + 1]; flat index b * T + t.
    assert positions.tolist() == [0, 2, 5] and targets.tolist() == [5, 7, 9]


def test_selected_head_with_nothing_supervised_is_zero() -> None:
    model = tiny_model()
    ids = torch.randint(3, 128, (2, 6))
    ce, n, _ = model.supervised_cross_entropy(ids, torch.full_like(ids, IGNORE_INDEX))
    assert n == 0 and ce.item() == 0.0
    ce.backward()  # still differentiable: zero gradients, no error


# --- attention, padding, cache --------------------------------------------------------------------------

@pytest.mark.parametrize("use_moe", [False, True])
def test_greedy_generate_with_cache_equals_argmax_without_cache(use_moe: bool) -> None:
    model = tiny_model(std=0.3, use_moe=use_moe).eval()
    ids = torch.randint(3, 128, (2, 7))
    out = to_hf(model).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         eos_token_id=None)
    x = ids
    with torch.no_grad():
        for _ in range(8):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)
    assert len(set(x[:, 7:].flatten().tolist())) > 2  # a degenerate repeat would prove little


def test_left_padded_generate_matches_unpadded() -> None:
    model = to_hf(tiny_model(std=0.3).eval())
    ids = torch.randint(3, 128, (2, 7))
    batch = ids.clone()
    batch[0, :3] = 0
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    kw = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "output_scores": True,
          "return_dict_in_generate": True}
    padded = model.generate(batch, attention_mask=mask, **kw)
    alone = model.generate(ids[:1, 3:], attention_mask=torch.ones(1, 4, dtype=torch.long), **kw)
    assert torch.equal(padded.sequences[0, 7:], alone.sequences[0, 4:])
    for s_pad, s_alone in zip(padded.scores, alone.scores):
        torch.testing.assert_close(s_pad[0], s_alone[0], atol=1e-4, rtol=1e-4)


def test_right_padding_does_not_change_real_tokens() -> None:
    model = tiny_model(std=0.3).eval()
    ids = torch.randint(3, 128, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(model(padded).logits[:, :5], ref, atol=1e-5, rtol=1e-5)
        masked = model(padded, attention_mask=mask).logits[:, :5]
        torch.testing.assert_close(masked, ref, atol=1e-5, rtol=1e-5)


def test_native_gqa_attention_gradients_match_explicit_attention() -> None:
    """Training attention (flash kernel reading shared kv heads) vs upstream's repeat_kv + softmax."""
    fast = tiny_model(std=0.3)
    slow = tiny_model(std=0.3, flash_attn=False)
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(3, 128, (2, 9))
    for model in (fast, slow):
        model(ids).logits.square().mean().backward()
    expected = _grads(slow)
    for name, grad in _grads(fast).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_sdpa_and_explicit_attention_agree() -> None:
    fast = tiny_model(std=0.3).eval()
    slow = tiny_model(std=0.3, flash_attn=False).eval()
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(3, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, slow(ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast(ids, attention_mask=mask).logits,
                                   slow(ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)


def test_logits_to_keep_and_cache_output() -> None:
    model = tiny_model().eval()
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        full = model(ids)
        last = model(ids, logits_to_keep=1, use_cache=True)
    assert full.past_key_values is None
    assert last.logits.shape == (2, 1, 128)
    torch.testing.assert_close(last.logits, full.logits[:, -1:])
    assert last.past_key_values.get_seq_length() == 6


def test_incremental_forward_with_cache_equals_full_forward() -> None:
    """Feeding a sequence in chunks (1, then 3, then 1 tokens) through the cache, no position_ids."""
    model = tiny_model(std=0.3).eval()
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :5], use_cache=True).past_key_values
        pieces = []
        for a, b in [(5, 6), (6, 9), (9, 10)]:
            out = model(ids[:, a:b], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full[:, 5:], atol=1e-5, rtol=1e-5)


# --- MoE ------------------------------------------------------------------------------------------------

def test_moe_aux_loss_trains_the_gate() -> None:
    model = tiny_model(use_moe=True).train()
    ids = torch.randint(3, 128, (2, 8))
    out = model(ids)
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() > 0
    out.aux_loss.backward()
    for layer in model.model.layers:
        assert layer.mlp.gate.weight.grad is not None
        assert layer.mlp.gate.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(ids).aux_loss.item() == 0.0


def test_dense_aux_loss_is_zero_tensor() -> None:
    out = tiny_model().train()(torch.randint(3, 128, (1, 4)))
    assert isinstance(out.aux_loss, torch.Tensor) and out.aux_loss.dim() == 0 and out.aux_loss.item() == 0.0


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_is_alpha_under_uniform_routing(seq_aux: bool) -> None:
    """Uniform gate probabilities: load and probability terms give exactly 1 per layer, times alpha."""
    layer = MOEFeedForward(ModelConfig(**TINY, use_moe=True, aux_loss_alpha=0.3, seq_aux=seq_aux)).train()
    nn.init.zeros_(layer.gate.weight)
    _, aux = layer(torch.randn(3, 5, 64))
    assert aux.item() == pytest.approx(0.3, abs=1e-6)


def test_seq_aux_equals_token_aux_for_one_sequence_only() -> None:
    def aux(seq_aux: bool, x: torch.Tensor) -> float:
        torch.manual_seed(1)
        layer = MOEFeedForward(ModelConfig(**TINY, use_moe=True, seq_aux=seq_aux)).train()
        return layer(x)[1].item()

    torch.manual_seed(0)
    one = torch.randn(1, 6, 64)
    assert aux(True, one) == pytest.approx(aux(False, one), abs=1e-6)
    many = torch.randn(4, 6, 64) * torch.linspace(0.1, 3.0, 4)[:, None, None]
    assert aux(True, many) != pytest.approx(aux(False, many), abs=1e-6)


def test_moe_matches_per_token_reference() -> None:
    """The batched routing equals a direct per-token mixture of its top-k experts plus the shared one."""
    torch.manual_seed(0)
    layer = MOEFeedForward(ModelConfig(**TINY, use_moe=True, num_experts_per_tok=2)).eval()
    x = torch.randn(2, 5, 64)
    y, _ = layer(x)
    probs = F.linear(x, layer.gate.weight).softmax(-1)
    for b in range(2):
        for t in range(5):
            w, idx = probs[b, t].topk(2)
            w = w / w.sum()
            expected = sum(wi * layer.experts[int(i)](x[b, t]) for wi, i in zip(w, idx))
            expected = expected + layer.shared_experts[0](x[b, t])
            torch.testing.assert_close(y[b, t], expected, atol=1e-5, rtol=1e-5)


def _dtypes_seen(module: nn.Module, run: object) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                seen.add(t.dtype)

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_moe_keeps_autocast_dtype() -> None:
    model = tiny_model(use_moe=True).train()
    layer = model.model.layers[0].mlp
    x = torch.randn(2, 6, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
        seen = _dtypes_seen(model, lambda: model(torch.randint(3, 128, (2, 6))).logits.sum().backward())
    assert y.dtype == torch.bfloat16
    assert aux.dtype == torch.float32
    assert torch.float16 not in seen


def test_fp32_model_has_no_fp16_anywhere() -> None:
    model = tiny_model(use_moe=True).train()
    ids = torch.randint(3, 128, (2, 6))
    seen = _dtypes_seen(model, lambda: model(ids, labels=ids))
    assert seen <= {torch.float32, torch.int64}
    assert model.model.layers[0].mlp(torch.randn(1, 3, 64))[0].dtype == torch.float32


# --- config, parameters, dropout, persistence --------------------------------------------------------

@pytest.mark.parametrize("layers,expected", [(2, 8_915_456), (8, 25_829_888)])
def test_parameter_counts(layers: int, expected: int) -> None:
    with torch.device("meta"):
        model = MiniMindForCausalLM(ModelConfig(hidden_size=512, num_hidden_layers=layers,
                                                   num_attention_heads=8, num_key_value_heads=2,
                                                   vocab_size=6400))
    assert model.config.intermediate_size == 1408
    assert count_parameters(model) == expected


def test_embeddings_are_tied_and_counted_once() -> None:
    model = tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert count_parameters(model) == untied - 128 * 64


def test_intermediate_size_formula() -> None:
    assert [default_intermediate_size(h) for h in (64, 512, 640, 768)] == [192, 1408, 1728, 2048]
    assert ModelConfig(**TINY, intermediate_size=100).intermediate_size == 100


def test_model_config_from_run_config() -> None:
    cfg = ModelConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                      dropout=0.1, use_moe=True, n_routed_experts=3, num_experts_per_tok=1,
                      n_shared_experts=0, aux_loss_alpha=0.05, seq_aux=False, norm_topk_prob=False,
                      rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=256)
    mc = model_config_from(cfg, vocab_size=6400)
    assert mc.vocab_size == 6400 and mc.intermediate_size == 192
    for f in dataclasses.fields(ModelConfig):
        if f.name not in ("vocab_size", "intermediate_size", "init_from", "family", "head_dim"):
            assert getattr(mc, f.name) == getattr(cfg, f.name), f.name
    assert model_config_from(dataclasses.replace(cfg, vocab_size=6464), 6400).vocab_size == 6464
    with pytest.raises(ConfigError, match="vocab_size"):
        model_config_from(dataclasses.replace(cfg, vocab_size=100), 6400)
    keys = MiniMindForCausalLM(mc).state_dict()
    assert "model.layers.0.mlp.gate.weight" in keys
    assert not any("shared_experts" in k for k in keys)


@pytest.mark.parametrize("bad", [{"num_attention_heads": 3}, {"num_key_value_heads": 3},
                                 {"use_moe": True, "num_experts_per_tok": 5}, {"scoring_func": "sigmoid"}])
def test_config_rejects_inconsistent_shapes(bad: dict) -> None:
    with pytest.raises(ValueError):
        ModelConfig(**{**TINY, **bad})


def test_dropout_is_honoured() -> None:
    ids = torch.randint(3, 128, (2, 8))
    noisy = tiny_model(dropout=0.5).train()
    # embedding, attention probabilities, attention output and each MLP output (upstream's sites)
    rates = [m.p for m in noisy.modules() if isinstance(m, nn.Dropout)]
    assert rates == [0.5] * (1 + 3 * 2)
    assert not torch.equal(noisy(ids).logits, noisy(ids).logits)
    noisy.eval()
    assert torch.equal(noisy(ids).logits, noisy(ids).logits)
    clean = tiny_model(dropout=0.0, use_moe=True).train()
    assert torch.equal(clean(ids).logits, clean(ids).logits)


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    model = tiny_model(std=0.3, use_moe=True).eval()
    to_hf(model).save_pretrained(tmp_path)
    loaded = MiniMindHFForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.config.use_moe and loaded.config.intermediate_size == model.config.intermediate_size
    ids = torch.randint(3, 128, (2, 7))
    back = from_hf(loaded)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        assert torch.equal(model(ids).logits, back(ids).logits)


@pytest.mark.parametrize("use_moe", [False, True])
def test_training_model_initialises_like_the_hf_model(use_moe: bool) -> None:
    """Same seed, same weights: the plain model draws what transformers' post_init draws."""
    torch.manual_seed(3)
    ours = MiniMindForCausalLM(ModelConfig(**TINY, use_moe=use_moe)).state_dict()
    torch.manual_seed(3)
    hf = MiniMindHFForCausalLM(MiniMindHFConfig(**TINY, use_moe=use_moe)).state_dict()
    assert list(ours) == list(hf)
    for key, value in ours.items():
        assert torch.equal(value, hf[key]), key


def test_hf_config_applies_the_same_checks() -> None:
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        MiniMindHFConfig(**{**TINY, "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="model.torch_dtype is not a known key"):
        ModelConfig(**TINY, torch_dtype="float16")  # the training config takes no stray keys


def test_training_imports_no_transformers() -> None:
    """transformers (with SciPy and scikit-learn behind it) costs every trial worker seconds and
    ~140 MB; the trainer, checkpoints, data and the Ray trainable must not need it."""
    import subprocess
    import sys

    code = ("import sys, minimind_train.train, minimind_train.checkpoint, minimind_train.data, tune.searcher;"
            "bad = sorted(m for m in ('transformers', 'sklearn', 'scipy') if m in sys.modules);"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_pth_round_trip_fp16(tmp_path: Path) -> None:
    """Saved the way upstream saves (fp16 state dict), a model loads strictly into a fresh one."""
    model = tiny_model(use_moe=True)
    path = tmp_path / "model.pth"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    fresh = tiny_model(seed=1, use_moe=True)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, model.half().float().eval()(ids).logits)

