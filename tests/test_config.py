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
        ("train.tokens_per_step=1000", "must be a multiple of train.micro_batch_size"),
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


@pytest.mark.parametrize("name", builtin_recipes())
def test_resolved_data_sources_are_what_the_run_reads(name, tmp_path):
    """`lmforge config NAME` shows the sources the run's stages really read."""
    from pathlib import Path

    from lmforge.run import stage_config

    cfg = load_config(name)
    run_dir = Path(cfg.output.dir)
    assert stage_config(cfg, run_dir).data.sources == cfg.data.sources
    if cfg.prepare.sources and "prepare" in cfg.run.stages:
        # stage_prepare writes the shards under <run>/prepared/shards
        assert cfg.data.sources == [str(run_dir / "prepared" / "shards")]
    elif cfg.prepare.sources:  # standalone `lmforge prepare` writes to prepare.output
        assert cfg.data.sources == [str(Path(cfg.prepare.output) / "shards")]


def test_config_command_prints_the_prepared_shards(capsys):
    from lmforge.cli import main

    assert main(["config", "gutenberg-small"]) == 0
    out = capsys.readouterr().out
    data = out[out.index("\ndata:") : out.index("\ntokenizer:")]
    assert "runs/gutenberg-small/prepared/shards" in data and "python-stdlib" not in data


def test_sources_that_contradict_the_prepare_stage_are_refused():
    with pytest.raises(ConfigError, match=r"data\.sources.*prepares its own data"):
        load_config("gutenberg-small", ["data.sources=[other.txt]"])


def test_stage_keys_do_not_depend_on_where_a_preparing_run_lives():
    from lmforge.run import stage_keys

    a = stage_keys(load_config("gutenberg-small"))
    b = stage_keys(load_config("gutenberg-small", ["output.dir=elsewhere"]))
    assert a == b


# ----------------------------------------------------------------------------- ranges


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from lmforge.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "override",
    [
        "--train.grad_clip=nan",
        "--train.weight_decay=nan",
        "--model.norm_eps=nan",
        "--model.init_std=-5",
        "--model.rope_theta=-1",
        "--train.max_time_s=-1",
        "--train.lr=inf",
        "--train.lr=-inf",
        "--train.eps=0",
        "--model.dropout=1",
        "--train.beta2=1.5",
        "--train.seed=-1",
        "--finetune.lr=-1",
        "--prepare.min_language_score=2",
        "--train.dist_timeout_s=1e15",  # beyond what a timedelta holds
        "--train.cpu_processes=100000",  # a process per unit: a fork bomb
        "--train.threads=10000000000",  # torch.set_num_threads takes a C int
    ],
)
def test_nonsense_numbers_are_refused_naming_the_key(capsys, override):
    code, out, err = run_cli(capsys, "config", "quickstart", override)
    key = override[2:].split("=")[0]
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and key in err and "expected" in err, err


def test_unknown_device_is_refused(capsys):
    code, _, err = run_cli(capsys, "config", "quickstart", "--train.device=banana")
    assert code == 2 and "train.device = 'banana' is not auto, cpu, cuda[:N]" in err
    assert load_config("quickstart", ["train.device=cuda:1"]).train.device == "cuda:1"


def test_range_message_names_key_value_and_range():
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", ["train.weight_decay=nan"])
    assert str(err.value) == (
        "command line: train.weight_decay: nan is not a finite number (expected >= 0)"
    )
    with pytest.raises(
        ConfigError, match=r"model\.dropout: 1\.0 is out of range \(expected in \[0, 1\)\)"
    ):
        load_config("quickstart", ["model.dropout=1"])


def test_every_numeric_key_declares_a_range_that_holds_its_default():
    from lmforge.config import Config, numeric_fields, range_of

    keys = list(numeric_fields(Config))
    assert len(keys) > 70  # the tree really was walked (sections and prepare.sources[])
    for key, f, _tp in keys:
        rng = range_of(f)
        assert rng is not None, f"{key} has no declared range: use num(default, ge=...)"
        assert rng.problem(f.default) == "", f"{key}: default {f.default} {rng.describe()}"


def test_sentinels_in_use_today_still_work():
    cfg = load_config(
        "quickstart",
        [
            "train.grad_clip=0",  # clipping off
            "train.max_time_s=0",  # no time budget
            "model.n_kv_heads=0",  # = n_heads
            "model.d_ff=0",  # derived
            "finetune.lr=0",  # keep train.lr
            "finetune.max_steps=0",  # keep train.max_steps
            "train.cpu_processes=0",  # one per core
            "eval.temperature=0",  # greedy
        ],
    )
    assert cfg.train.grad_clip == 0 and cfg.finetune.lr == 0


def test_ranges_are_checked_in_recipes_and_saved_configs(tmp_path):
    from lmforge.config import config_from_dict

    path = tmp_path / "r.yaml"
    path.write_text("train:\n  weight_decay: .nan\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: train\.weight_decay: nan is not a finite"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"saved config: model\.init_std: -5\.0 is out of range"):
        config_from_dict({"model": {"init_std": -5}})


# ----------------------------------------------------------------------------- override parsing


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=1e999", r"train\.lr: '1e999' is too large for a number"),
        ("model.n_layers=0x10", r"model\.n_layers: '0x10' is not a decimal number"),
        ("model.n_layers=010", None),  # decimal 10, not YAML 1.1's octal 8
        ("model.n_layers=1:30", r"model\.n_layers: '1:30' should be an integer"),
        ("model.n_layers=" + "9" * 30, r"model\.n_layers: 9{30} is too large in magnitude"),
        ("model.n_layers=" + "9" * 5000, r"model\.n_layers: '9{80}'…\(5000 chars\) has too many"),
        ("train.seed=-" + "9" * 20, r"train\.seed: -9{20} is too large in magnitude"),
        ("model.n_layers=true", r"model\.n_layers: True should be an integer"),
        ("train.lr=yes", r"train\.lr: True should be a number"),
        ("train.lr=fast", r"train\.lr: 'fast' should be a number"),
        ("model.n_layers=2.5", r"model\.n_layers: 2\.5 should be an integer"),
        ("model.n_layers=nan", r"model\.n_layers: nan should be an integer"),
        ("train.lr=.nan", r"train\.lr: nan is not a finite number"),
    ],
)
def test_override_numbers(override, message):
    if message is None:
        assert load_config("quickstart", [override]).model.n_layers == 10
        return
    with pytest.raises(ConfigError, match=message) as err:
        load_config("quickstart", [override])
    assert len(str(err.value)) < 300


def test_override_number_forms_people_type():
    cfg = load_config(
        "quickstart", ["train.lr=3e-4", "train.max_steps=1_000", "train.grad_clip=-0"]
    )
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.max_steps == 1000
    assert cfg.train.grad_clip == 0.0 and str(cfg.train.grad_clip) == "0.0"  # not -0.0


def test_recipe_numbers_read_as_yaml_1_2(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  n_layers: 010\ntrain:\n  lr: 3e-4\n  max_steps: 0x10\n")
    cfg = load_config(str(path))  # YAML 1.1 read 010 as octal 8 and 3e-4 as text
    assert (cfg.model.n_layers, cfg.train.lr, cfg.train.max_steps) == (10, 3e-4, 16)
    path.write_text("train:\n  max_steps: 1:30\n")  # YAML 1.1: base 60, 90
    with pytest.raises(ConfigError, match=r"train\.max_steps: '1:30' should be an integer"):
        load_config(str(path))


def test_huge_values_are_quoted_briefly(capsys):
    code, _, err = run_cli(capsys, "config", "quickstart", "--train.lr=" + "x" * 1_000_000)
    assert code == 2 and len(err) < 300 and "train.lr" in err and "(1000000 chars)" in err


# ----------------------------------------------------------------------------- recipes: extends


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_extends_self_names_the_cycle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: a\.yaml -> a\.yaml$"):
        load_config("a.yaml")


def test_extends_cycle_of_two_and_three(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: a\.yaml -> b\.yaml -> a\.yaml$"):
        load_config("a.yaml")
    write(tmp_path / "top.yaml", "extends: c.yaml\n")  # enters a loop it is not part of
    write(tmp_path / "c.yaml", "extends: d.yaml\n")
    write(tmp_path / "d.yaml", "extends: e.yaml\n")
    write(tmp_path / "e.yaml", "extends: c.yaml\n")
    code, _, err = run_cli(capsys, "config", "top.yaml")
    assert code == 2
    assert (
        err == "lmforge: config error: recipes extend each other in a cycle: "
        "c.yaml -> d.yaml -> e.yaml -> c.yaml\n"
    )


def test_extends_file_next_to_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    write(tmp_path / "recipes" / "base.yaml", "extends: quickstart\ntrain:\n  max_steps: 9\n")
    write(tmp_path / "recipes" / "mine.yaml", "extends: base.yaml\nmodel:\n  n_layers: 2\n")
    monkeypatch.chdir(tmp_path)  # base.yaml is not in the working folder
    cfg = load_config("recipes/mine.yaml")
    assert (cfg.train.max_steps, cfg.model.n_layers, cfg.name) == (9, 2, "quickstart")


def test_extends_missing_parent_names_it_and_the_referrer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"not found: 'nowhere\.yaml' \(extends: in a\.yaml\)"):
        load_config("a.yaml")
    write(tmp_path / "a.yaml", "extends: no-such-recipe\n")
    with pytest.raises(ConfigError, match=r"'no-such-recipe' \(extends: in a\.yaml\)"):
        load_config("a.yaml")
    write(tmp_path / "a.yaml", "extends: [quickstart]\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: extends: \['quickstart'\] should be a recipe"):
        load_config("a.yaml")


# ----------------------------------------------------------------------------- recipes: YAML bounds


def alias_bomb(levels: int = 9, prefix: str = "name:\n") -> str:
    """The "billion laughs": each level a list of nine aliases of the level before (9**9 leaves)."""
    lines = ["- &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"- &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return prefix + "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (alias_bomb(), "more than 100,000 values once aliases are expanded"),
        ("name: &a [*a]\n", "an alias refers to the value that contains it"),
        ("name: " + "[" * 10_000 + "]" * 10_000 + "\n", "values nested more than 64 deep"),
        ("name: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n", "values nested more than"),
    ],
    ids=["alias-bomb", "recursive-alias", "deep-list", "deep-mapping"],
)
def test_hostile_yaml_fails_fast_with_a_short_message(tmp_path, capsys, text, message):
    import tracemalloc

    path = write(tmp_path / "bomb.yaml", text)
    tracemalloc.start()
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert len(str(err.value).encode()) < 300
    code, out, err_text = run_cli(capsys, "config", path)
    assert code == 2 and out == "" and message in err_text and len(err_text.encode()) < 300
    assert err_text.count("\n") == 1
    # a parent reached through extends: is read with the same bounds
    child = write(tmp_path / "child.yaml", f"extends: {path}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(child)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Bounded by the work done, not by the clock (a shared machine's speed swings): the old
    # loader expanded the bomb until it held 1.7 GB.
    assert peak < 64 * 2**20, peak


def test_alias_bomb_as_an_override_is_refused():
    value = "[" + alias_bomb(prefix="").replace("\n", ", ").replace("- ", "")[:-2] + "]"
    with pytest.raises(ConfigError, match=r"data\.sources") as err:
        load_config("quickstart", ["data.sources=" + value])
    assert len(str(err.value)) < 300


def test_duplicate_keys_are_refused(tmp_path):
    path = write(
        tmp_path / "r.yaml", "train:\n  lr: 1.0e-3\nmodel:\n  n_layers: 2\ntrain:\n  max_steps: 5\n"
    )
    with pytest.raises(
        ConfigError, match=r"r\.yaml, line 5, column 1: .*key 'train' appears twice"
    ):
        load_config(path)  # YAML 1.1 loaders keep the second train: and drop lr silently


def test_modest_anchors_still_work(tmp_path):
    path = write(tmp_path / "r.yaml", "eval:\n  prompts: &p [a, b]\nbias:\n  axes: *p\n")
    assert load_config(path).bias.axes == ["a", "b"]


def test_recipe_file_bounds(tmp_path):
    big = write(tmp_path / "big.yaml", "# " + "x" * 1_000_000 + "\nname: big\n")
    with pytest.raises(ConfigError, match=r"big\.yaml: larger than 1,000,000 bytes"):
        load_config(big)
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: cannot read the recipe: not UTF-8"):
        load_config(str(tmp_path / "latin1.yaml"))
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"recipe file not found: '.*dir\.yaml'"):
        load_config(str(tmp_path / "dir.yaml"))


def test_yaml_errors_are_one_line(tmp_path, capsys):
    path = write(tmp_path / "broken.yaml", "model:\n  n_layers: [1, 2\n")
    code, _, err = run_cli(capsys, "config", path)
    assert code == 2 and err.count("\n") == 1
    assert "broken.yaml, line 3, column 1: not valid YAML" in err
