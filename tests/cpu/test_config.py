"""DashConfig: parsing of --additional-config '{"dash": {...}}' and its error messages."""
import json

import pytest

from vllm_dash.config import TRAINING_FREE_SUMMARY, DashConfig, config_help, engine_config
from vllm_dash.kernels.params import DashParams


def test_defaults_and_round_trip():
    cfg = DashConfig.from_additional_config(None)
    assert cfg == DashConfig()
    assert DashConfig.from_mapping(cfg.to_dict()) == cfg
    assert DashConfig.from_additional_config({"other_plugin": 1}) == cfg
    assert DashConfig.from_additional_config(json.dumps({"dash": {"alpha": 2}})).alpha == 2


def test_values_are_used():
    cfg = DashConfig.from_additional_config(
        {"dash": {"alpha": 1.25, "score_scale": [0.5, 2.0], "prior_weight": 1,
                  "sink_blocks": 2, "local_blocks": 3, "min_blocks": 4, "max_blocks": 9,
                  "dense_below": 100, "score_norm": "none", "prior_norm": "max"}})
    cfg.check_num_layers(2)
    p1 = cfg.params_for_layer(1)
    assert isinstance(p1, DashParams)
    assert p1.score_scale == 2.0 and cfg.params_for_layer(0).score_scale == 0.5
    assert p1.alpha == 1.25 and p1.max_blocks == 9 and p1.prior_norm == "max"
    assert p1.prior_weight == 1.0 and p1.dense_below == 100 and p1.score_norm == "none"
    assert cfg.params_for_layer(1) is p1                   # built once
    one = DashConfig.from_mapping({"alpha": 2, "score_scale": 3})
    assert one.params_for_layer(0) is one.params_for_layer(7)
    assert one.params_for_layer(5) == DashParams(alpha=2.0, score_scale=3.0, prior_weight=0.0,
                                                 sink_blocks=1, local_blocks=1, min_blocks=4,
                                                 score_norm="standardize", summary="minmax")
    with pytest.raises(ValueError, match="score_scale has 2 entries but the model has 3"):
        cfg.check_num_layers(3)


@pytest.mark.parametrize("dash,key", [
    ({"alpah": 1.5}, "alpah"),
    ({"alpha": 1.0}, "alpha"), ({"alpha": 2.5}, "alpha"), ({"alpha": "x"}, "alpha"),
    ({"score_scale": -1}, "score_scale"), ({"score_scale": [1.0, -2.0]}, "score_scale"),
    ({"score_scale": []}, "score_scale"), ({"score_scale": float("nan")}, "score_scale"),
    ({"prior_weight": 2}, "prior_weight"), ({"sink_blocks": -1}, "sink_blocks"),
    ({"local_blocks": 1.5}, "local_blocks"), ({"min_blocks": True}, "min_blocks"),
    ({"max_blocks": 1, "sink_blocks": 1}, "max_blocks"), ({"dense_below": -3}, "dense_below"),
    ({"score_norm": "zscore"}, "score_norm"), ({"prior_norm": "l1"}, "prior_norm"),
    ({"selector": "quest"}, "selector"), ({"selector": "topk", "min_blocks": 0}, "min_blocks"),
    ({"stats_interval": -1}, "stats_interval"), ({"score_scale_file": 3}, "score_scale_file"),
    ({"score_scale_file": "/nonexistent/scales.json"}, "score_scale_file"),
    ({"summary": "quest"}, "summary"), ({"summary": None}, "summary"),
    ({"summary_file": 3}, "summary_file"), ({"summary_file": ""}, "summary_file"),
    ({"summary_file": "/nonexistent/pool.safetensors"}, "summary_file"),
    ({"summary": "minmax", "summary_file": __file__}, "summary_file"),
])
def test_bad_values_name_the_key_and_allowed_values(dash, key):
    with pytest.raises(ValueError, match=key) as e:
        DashConfig.from_additional_config({"dash": dash})
    msg = str(e.value)
    assert "allowed" in msg or "must" in msg
    assert msg.startswith(("DASH config", "unknown DASH config")) and "\n" not in msg


def test_not_an_object():
    with pytest.raises(ValueError, match="JSON object"):
        DashConfig.from_additional_config({"dash": [1, 2]})


def test_score_scale_file(tmp_path):
    f = tmp_path / "scales.json"
    f.write_text(json.dumps({"score_scale": [1.0, 2.0, 3.0]}))
    cfg = DashConfig.from_additional_config({"dash": {"score_scale_file": str(f)}})
    assert cfg.score_scale == (1.0, 2.0, 3.0)
    f.write_text(json.dumps({"scales": [1.0]}))
    with pytest.raises(ValueError, match="score_scale_file"):
        DashConfig.from_additional_config({"dash": {"score_scale_file": str(f)}})


def test_help_lists_every_key():
    text = config_help()
    for key in DashConfig.keys():
        assert key in text


def test_engine_config_parses_once_per_process(tmp_path, monkeypatch):
    """The builder and every layer's Impl share one parsed config: the scale file is read
    once, and the same additional_config gives the same object."""
    f = tmp_path / "scales.json"
    f.write_text(json.dumps({"score_scale": [1.0, 2.0]}))
    import vllm_dash.config as config_mod
    reads = []
    orig = config_mod._load_scale_file
    monkeypatch.setattr(config_mod, "_load_scale_file", lambda p: reads.append(p) or orig(p))
    extra = {"dash": {"score_scale_file": str(f), "min_blocks": 2}, "other": 1}
    a = engine_config(extra)
    b = engine_config(json.dumps({"dash": {"min_blocks": 2, "score_scale_file": str(f)}}))
    assert a is b and a.score_scale == (1.0, 2.0) and len(reads) == 1
    assert engine_config(None) is engine_config({"other": 2}) == DashConfig()
    with pytest.raises(ValueError, match="JSON object"):
        engine_config({"dash": [1]})


def test_summary_kinds_and_auto_resolution():
    """"auto" builds the training-free kind until resolved; resolution picks attn_pool only
    when pooling vectors exist; an explicit attn_pool without vectors is an error."""
    from vllm_dash.config import TRAINING_FREE_SUMMARY
    auto = DashConfig.from_mapping(None)
    assert auto.summary == "auto" and auto.summary_file is None
    assert auto.params_for_layer(0).summary == TRAINING_FREE_SUMMARY == "minmax"
    assert auto.resolve_summary(False).params_for_layer(0).summary == "minmax"
    pooled = auto.resolve_summary(True)
    assert pooled.summary == "attn_pool" and pooled.params_for_layer(3).summary == "attn_pool"
    for kind in ("mean", "minmax"):
        cfg = DashConfig.from_mapping({"summary": kind})
        assert cfg.resolve_summary(True) is cfg and cfg.params_for_layer(0).summary == kind
    explicit = DashConfig.from_mapping({"summary": "attn_pool"})
    assert explicit.resolve_summary(True) is explicit
    with pytest.raises(ValueError, match="summary='attn_pool' needs pooling vectors") as e:
        explicit.resolve_summary(False)
    assert "\n" not in str(e.value)
    with_file = DashConfig.from_mapping({"summary_file": __file__})   # any existing file
    assert with_file.summary_file == __file__ and "summary" in config_help()


def test_runtime_change_keeps_the_engine_summary():
    """set_runtime_config -> Impl.set_config -> runtime_change: knobs may change, the summary
    kind and summary_file may not."""
    engine = DashConfig.from_mapping({}).resolve_summary(False)       # the training-free kind
    assert engine.summary == TRAINING_FREE_SUMMARY == "minmax"
    new = engine.runtime_change(DashConfig.from_mapping({"min_blocks": 2}), has_pool=False)
    assert new.summary == TRAINING_FREE_SUMMARY and new.min_blocks == 2
    assert engine.runtime_change(DashConfig.from_mapping({"summary": "minmax"}),
                                 has_pool=False).summary == "minmax"
    with pytest.raises(ValueError, match="summary='mean'.*engine's summary='minmax'") as e:
        engine.runtime_change(DashConfig.from_mapping({"summary": "mean"}), has_pool=False)
    assert "start a new engine" in str(e.value) and "\n" not in str(e.value)
    pooled = DashConfig.from_mapping({"summary_file": __file__}).resolve_summary(True)
    same = pooled.runtime_change(DashConfig.from_mapping({"summary_file": __file__,
                                                          "score_scale": 4}), has_pool=True)
    assert same.summary == "attn_pool" and same.score_scale == 4
    with pytest.raises(ValueError, match="summary_file=None cannot replace"):
        pooled.runtime_change(DashConfig.from_mapping({}), has_pool=True)
    with pytest.raises(ValueError, match="-> 'mean'"):
        pooled.runtime_change(DashConfig.from_mapping({"summary": "mean"}), has_pool=True)
