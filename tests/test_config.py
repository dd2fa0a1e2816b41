"""sp_cam/config.py: typed defaults, YAML files, overrides, errors that list the valid keys, save/load round trip."""

import pytest

from sp_cam.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    valid_keys,
)


def test_defaults_and_valid_keys():
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.data.dataset == "toy"
    keys = valid_keys()
    assert "data.crop_size" in keys and "toy.image_size" in keys and "pseudo.t_list" in keys
    assert len(keys) == len(set(keys))


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["data.crop_sise=3"])
    msg = str(e.value)
    assert "data.crop_sise" in msg and "data.crop_size" in msg and "\n" not in msg
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["nosection.key=3"])
    assert "run.work_dir" in str(e.value)


@pytest.mark.parametrize(
    "override",
    ["data.crop_size=abc", "data.crop_size=1.5", "fcn.shuffle=3", "pseudo.t_list=[1, x]", "cam.lr=true"],
)
def test_wrong_type(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(overrides=[override])


def test_override_types():
    cfg = load_config(
        overrides=[
            "data.crop_size=64",
            "cam.lr=1",
            "fcn.shuffle=false",
            "pseudo.t_list=[0, 5]",
            "pseudo.scales=1",
            "data.root=",
            "run.work_dir=/tmp/x y",
        ]
    )
    assert cfg.data.crop_size == 64 and cfg.cam.lr == 1.0 and isinstance(cfg.cam.lr, float)
    assert cfg.fcn.shuffle is False and cfg.pseudo.t_list == [0, 5] and cfg.pseudo.scales == [1.0]
    assert cfg.data.root == "" and cfg.run.work_dir == "/tmp/x y"
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["data.crop_size"])


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  crop_size: 96\n  dataset: folder\ntoy:\n  num_train: 7\n")
    cfg = load_config(path, ["data.crop_size=128"])
    assert cfg.data.crop_size == 128 and cfg.data.dataset == "folder" and cfg.toy.num_train == 7
    path.write_text("data:\n  crop_sise: 96\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)
    path.write_text("data: [1, 2]\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    path.write_text("data: {crop_size: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_save_load_round_trip(tmp_path):
    cfg = load_config(overrides=["data.crop_size=64", "pseudo.th_list=[0.1, 0.5]", "run.seed=3"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError):
        config_from_dict({"data": {"bogus": 1}})
