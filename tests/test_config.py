import pytest

from lmforge.config import ConfigError, builtin_recipes, load_config, parse_overrides


def test_builtin_recipes_load():
    for name in builtin_recipes():
        cfg = load_config(name)
        assert cfg.name == name


def test_overrides_types():
    cfg = load_config("quickstart", ["--train.lr=3e-4", "model.n_layers=6", "train.compile=true"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.n_layers == 6 and cfg.train.compile is True
    assert parse_overrides(["a.b=[x, y]"]) == {"a": {"b": ["x", "y"]}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_heads=5", "model.n_heads = 5 must divide model.d_model"),
        ("train.lr=-1", "train.lr"),
        ("model.depth=3", "unknown key 'model.depth'"),
        ("model.n_layers=two", "model.n_layers: 'two' should be an integer"),
        ("model.norm=batchnorm", "model.norm: 'batchnorm' is not one of"),
        ("model.n_kv_heads=3", "model.n_kv_heads = 3 must divide model.n_heads"),
        ("train.tokens_per_step=1000", "must be a multiple of micro_batch_size"),
        ("train.compile=maybe", "should be true or false"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        load_config("quickstart", [override])
    assert "command line" in str(err.value) or "recipe" in str(err.value)


def test_bad_recipe_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_layers: 4\n  d_modle: 128\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.d_modle'"):
        load_config(str(path))
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


def test_recipe_extends(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: quickstart\ntrain:\n  max_steps: 7\n")
    cfg = load_config(str(path))
    assert cfg.train.max_steps == 7 and cfg.data.sources == ["python-stdlib"]


def test_preset_fills_unset_fields_only():
    cfg = load_config(None, ["model.preset=gpt2-124m", "model.n_layers=2"])
    assert cfg.model.d_model == 768 and cfg.model.n_layers == 2 and cfg.model.bias is True


def test_cli_reports_config_error(capsys):
    from lmforge.cli import main

    assert main(["config", "quickstart", "--model.n_heads=7"]) == 2
    assert "model.n_heads" in capsys.readouterr().err
