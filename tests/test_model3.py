"""MiniMind-3 (model.family minimind3): upstream fixtures, MiniMind's balance loss, generation checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED, need_shared

from minimind_train.causal_lm import token_cross_entropy
from minimind_train.chat import IGNORE_INDEX
from minimind_train.checkpoint import WeightMismatchError, load_minimind_weights, save_checkpoint
from minimind_train.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    run_config_from_dict,
)
from minimind_train.data import DEMO_DATA_PATH, prepare_data
from minimind_train.model import (
    GenerationMismatchError,
    MiniMindForCausalLM,
    build_model,
    count_parameters,
    detect_family,
    from_upstream,
)
from minimind_train.model3 import MiniMind3ForCausalLM, default_intermediate_size3, switch_aux_loss
from minimind_train.train import init_state, train_epochs

FIXTURES3 = SHARED / "fixtures" / "minimind3"
FIXTURES2 = SHARED / "fixtures" / "minimind2"
TINY3 = ModelConfig(family="minimind3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)


def _ref(name: str) -> dict:
    return json.loads((need_shared(FIXTURES3) / f"{name}.reference.json").read_text())


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_reproduces_upstream_minimind3_reference(name: str) -> None:
    ref = _ref(name)
    model = from_upstream(ref["config"], str(FIXTURES3 / f"{name}.pth"))
    assert isinstance(model, MiniMind3ForCausalLM)
    assert sorted(model.state_dict()) == ref["state_dict_keys"]
    assert count_parameters(model) == ref["params"]
    x, y = torch.tensor(ref["input_ids"]), torch.tensor(ref["labels"])
    with torch.no_grad():
        out = model(x, labels=y)
        assert out.loss.item() == pytest.approx(ref["loss_eval"], abs=1e-4)
        assert out.aux_loss.item() == ref["aux_loss_eval"] == 0.0
        for (b, t), values in zip(ref["logits_sample"]["positions"], ref["logits_sample"]["values"]):
            torch.testing.assert_close(out.logits[b, t, :16], torch.tensor(values), atol=1e-4, rtol=0)
        assert out.logits.abs().sum().item() == pytest.approx(ref["logits_sum_abs"], rel=1e-5)
        model.train()
        train = model(x, labels=y)
        assert train.loss.item() == pytest.approx(ref["loss_train_mode"], abs=1e-4)
        assert train.aux_loss.item() == pytest.approx(ref["aux_loss_train_mode"], abs=1e-6, rel=1e-4)
        # The training path (LM head at supervised positions only) gives the same loss and aux loss.
        ce_sum, n, aux = model.supervised_cross_entropy(x, y)
        assert (ce_sum / n).item() == pytest.approx(ref["loss_train_mode"], abs=1e-4)
        assert aux.item() == pytest.approx(ref["aux_loss_train_mode"], abs=1e-6, rel=1e-4)


def test_moe_aux_loss_is_the_sum_of_per_layer_losses_not_qwen_pooled() -> None:
    ref = _ref("tiny_moe")
    model = from_upstream(ref["config"], str(FIXTURES3 / "tiny_moe.pth")).train()
    x = torch.tensor(ref["input_ids"])
    with torch.no_grad():
        out = model.model(input_ids=x, output_router_logits=True, use_cache=False)
    per_layer = [switch_aux_loss(lg, 1, 5e-4).item() for lg in out.router_logits]
    assert per_layer == pytest.approx(ref["aux_loss_train_mode_per_layer"], rel=1e-4)
    pooled = ref["qwen3_equivalence"]["aux_loss"]["qwen3moe_aux_loss_times_coef (layers concatenated)"]
    assert abs(sum(per_layer) - pooled) > 1e-4  # the two definitions really differ here


def test_other_generation_checkpoint_is_refused(tmp_path: Path) -> None:
    need_shared(FIXTURES2)
    ref2 = json.loads((FIXTURES2 / "tiny_dense.reference.json").read_text())
    ref3 = _ref("tiny_dense")
    mm2_state = torch.load(FIXTURES2 / "tiny_dense.pth", weights_only=True)
    mm3_state = torch.load(FIXTURES3 / "tiny_dense.pth", weights_only=True)
    assert (detect_family(mm2_state), detect_family(mm3_state)) == ("minimind2", "minimind3")
    # from_upstream with the other generation's config
    with pytest.raises(GenerationMismatchError, match="MiniMind2 .*checkpoint but the config is a MiniMind-3"):
        from_upstream(ref3["config"], str(FIXTURES2 / "tiny_dense.pth"))
    # init_from into a model of the other generation
    mm3 = MiniMind3ForCausalLM(ref3["config"])
    with pytest.raises(WeightMismatchError, match=r"is a MiniMind2 \(upstream 274483c\) checkpoint.*"
                                                  r"model.family: minimind2"):
        load_minimind_weights(mm3, FIXTURES2 / "tiny_dense.pth")
    mm2 = from_upstream(ref2["config"], str(FIXTURES2 / "tiny_dense.pth"))
    assert isinstance(mm2, MiniMindForCausalLM)
    with pytest.raises(WeightMismatchError, match=r"is a MiniMind-3 .*model.family: minimind3"):
        load_minimind_weights(mm2, FIXTURES3 / "tiny_dense.pth")


def test_family_is_validated_and_defaults_follow_it() -> None:
    with pytest.raises(ConfigError, match=r"model.family='minimind4'.*\['minimind2', 'minimind3'\]"):
        run_config_from_dict({"model": {"family": "minimind4"}})
    with pytest.raises(ConfigError, match=r"model.family='x'"):
        ModelConfig(family="x")  # type: ignore[arg-type]
    mm2 = ModelConfig()
    assert (mm2.family, mm2.hidden_size, mm2.num_key_value_heads, mm2.rms_norm_eps, mm2.n_shared_experts,
            mm2.num_experts_per_tok, mm2.aux_loss_alpha, mm2.seq_aux) == \
        ("minimind2", 512, 2, 1e-5, 1, 2, 0.1, True)
    mm3 = run_config_from_dict({"model": {"family": "minimind3"}}).model
    assert (mm3.hidden_size, mm3.num_key_value_heads, mm3.rms_norm_eps, mm3.n_shared_experts,
            mm3.num_experts_per_tok, mm3.aux_loss_alpha, mm3.seq_aux) == (768, 4, 1e-6, 0, 1, 5e-4, False)
    for bad, key in (({"n_shared_experts": 1}, "n_shared_experts"), ({"seq_aux": True}, "seq_aux"),
                     ({"dropout": 0.1}, "dropout")):
        with pytest.raises(ConfigError, match=f"model.{key}=.*family='minimind3'"):
            ModelConfig(family="minimind3", **bad)
    with pytest.raises(ConfigError, match="model.head_dim=32 is not allowed with model.family='minimind2'"):
        ModelConfig(hidden_size=64, num_attention_heads=4, head_dim=32)


def test_default_minimind3_size_matches_upstream() -> None:
    assert default_intermediate_size3(768) == 2432
    with torch.device("meta"):
        model = build_model(ModelConfig(family="minimind3"), vocab_size=6400)
    assert isinstance(model, MiniMind3ForCausalLM)
    assert round(count_parameters(model) / 1e6, 1) == 63.9  # upstream: 63.9M dense at 768 x 8


def test_head_dim_may_differ_from_hidden_over_heads() -> None:
    model = build_model(dataclasses.replace(TINY3, head_dim=32), vocab_size=128)
    assert model.state_dict()["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)


@pytest.mark.parametrize("use_moe", [False, True])
def test_supervised_cross_entropy_equals_full_forward(use_moe: bool) -> None:
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY3, use_moe=use_moe), vocab_size=128).train()
    ids = torch.randint(3, 128, (3, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[1, 8:] = IGNORE_INDEX
    out = model(ids, labels=labels)
    ce_sum, n = token_cross_entropy(out.logits, labels)
    ce_fast, n_fast, aux = model.supervised_cross_entropy(ids, labels)
    torch.testing.assert_close(ce_fast, ce_sum, rtol=1e-5, atol=1e-5)
    assert n_fast == int(n)
    torch.testing.assert_close(aux, out.aux_loss)
    assert (aux.item() > 0) == use_moe
    model.eval()
    assert model(ids).aux_loss.item() == 0.0


def test_minimind3_trains_and_checkpoints_like_upstream(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(DEMO_DATA_PATH.read_text(encoding="utf-8").splitlines(keepends=True)[:32]),
                    encoding="utf-8")
    cfg = RunConfig(
        model=dataclasses.replace(TINY3, use_moe=True),
        data=DataConfig(train_path=str(path), val_fraction=0.25, max_seq_len=64,
                        cache_dir=str(tmp_path / "cache")),
        train=TrainConfig(epochs=2, batch_size=8, learning_rate=3e-3, device="cpu", dtype="float32",
                          seed=7, eval_batch_size=16),
    )
    data = prepare_data(cfg.data)
    results = list(train_epochs(cfg, data))
    assert results[1].metrics["val_loss"] < results[0].metrics["val_loss"]
    assert results[0].metrics["aux_loss"] > 0
    folder = save_checkpoint(tmp_path / "ck", results[-1].state, cfg)
    saved = torch.load(folder / "model.pth", weights_only=True)
    # As upstream saves: fp16, the tied embedding and head both present.
    assert saved["lm_head.weight"].dtype == torch.float16 and "model.embed_tokens.weight" in saved
    fresh = init_state(dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, init_from=str(folder / "model.pth"))), vocab_size=data.vocab_size)
    assert isinstance(fresh.model, MiniMind3ForCausalLM)


def test_minimind3_space_is_valid_once_its_files_exist(tmp_path: Path) -> None:
    import shutil

    from minimind_train.tokenizer import BUNDLED_TOKENIZER3_DIR
    from tune.space import SpaceError, load_space

    repo = Path(__file__).resolve().parents[1]
    space = tmp_path / "minimind3_sft.yaml"
    shutil.copy(repo / "search_spaces" / "minimind3_sft.yaml", space)
    with pytest.raises(SpaceError, match=r"model\.init_from"):
        load_space(space)
    (tmp_path / "pretrain_768.pth").write_bytes(b"")
    (tmp_path / "sft_mini_512.jsonl").write_text("", encoding="utf-8")
    shutil.copytree(BUNDLED_TOKENIZER3_DIR, tmp_path / "minimind3_tokenizer")
    spec = load_space(space)
    m = spec.run.model
    assert (m.family, m.hidden_size, m.num_hidden_layers, m.num_key_value_heads, m.rms_norm_eps) == \
        ("minimind3", 768, 8, 4, 1e-6)
    assert spec.run.data.val_max_samples == 5000 and spec.run.data.max_seq_len == 768
    with torch.device("meta"):
        model = build_model(m, vocab_size=6400)
    assert round(count_parameters(model) / 1e6, 1) == 63.9
