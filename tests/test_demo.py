"""fastkd demo: the training loop runs end to end (one seed, few epochs) and reports every column."""

import io
import json
import math

import pytest

pytest.importorskip("sklearn")

from fastkd import cli, demo  # noqa: E402


def test_demo_runs_and_reports_every_model_and_column(tmp_path):
    out, progress = io.StringIO(), io.StringIO()
    path = tmp_path / "demo.json"
    summary = demo.run(seeds=1, epochs=2, json_path=str(path), stream=out, progress_stream=progress)
    text = out.getvalue()
    for column in ("test accuracy %", "test errors", "top-1 agreement %", "predictive KL", "train time s"):
        assert column in text
    for row in ("teacher", "student, scratch", "student, distilled"):
        assert row in text
    assert "seed 1/1 student (distilled)" in progress.getvalue() and progress.getvalue().endswith("\n")
    record = json.loads(path.read_text())
    assert record["sizes"] == {"train": 250, "val": 359, "test": 360}
    assert record["epochs"] == {"teacher": 2, "student": 2}
    for name in ("scratch", "distilled"):
        test = summary[name]["test"]
        assert 0.0 <= test["accuracy"][0] <= 100.0 and test["errors"][0] == round(360 * (1 - test["accuracy"][0] / 100))
        assert 0.0 <= test["agreement"][0] <= 100.0 and test["predictive_kl"][0] >= 0.0
    assert "agreement" not in summary["teacher"]["test"]


def test_training_set_can_be_cut_to_a_number_per_class():
    splits = demo.load_splits("cpu", per_class=5)
    assert len(splits["train"].y) == 50 and splits["train"].y.bincount().tolist() == [5] * 10
    assert len(splits["test"].y) == 360
    whole = demo.load_splits("cpu")
    assert len(whole["train"].y) == 1078
    train_rows = {tuple(row.tolist()) for row in whole["train"].x}
    assert all(tuple(row.tolist()) in train_rows for row in splits["train"].x)
    assert not {tuple(row.tolist()) for row in splits["test"].x} & {tuple(r.tolist()) for r in splits["train"].x}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--seeds", "0"], "seeds must be an integer"),
        (["demo", "--epochs", "0"], "epochs must be an integer"),
        (["demo", "--temperature", "-1"], "temperature must be a finite positive"),
        (["demo", "--alpha", "1.5"], "alpha must lie in"),
    ],
)
def test_demo_command_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err


def test_the_seeds_suite_runs_every_method_on_tiny_epochs():
    from fastkd import demo_suite

    out, progress = io.StringIO(), io.StringIO()
    summary = demo_suite.run_suite(seeds=1, epochs=2, stream=out, progress_stream=progress)
    assert set(summary) == {"teacher", *demo_suite.METHODS}
    for method in demo_suite.METHODS:
        assert 0 <= summary[method]["accuracy"][0] <= 100 and math.isfinite(summary[method]["predictive_kl"][0])
    assert all(name in out.getvalue() for name in demo_suite.METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        demo_suite.run_suite(("kd", "nope"), seeds=1, epochs=1, stream=out, progress_stream=progress)
