"""fastkd bench: argument parsing, and each op's table and JSON on tiny CPU shapes (timing itself is not tested)."""

import json

import pytest

from fastkd import bench, cli


@pytest.mark.parametrize(
    "spec, op, expected",
    [
        ("8192x32000:bf16", "kd", ((8192, 32000), "torch.bfloat16")),
        ("2x3x4x5", "feature", ((2, 3, 4, 5), "torch.float32")),
        ("resnet18:fp16", "lipschitz", ((), "torch.float16")),
    ],
)
def test_parse_spec(spec, op, expected):
    shape, dtype = bench.parse_spec(spec, op)
    assert (shape, str(dtype)) == expected


@pytest.mark.parametrize(
    "spec, op, message",
    [
        ("8x16x2", "kd", "ROWSxVOCAB"),
        ("2x3x4", "feature", "NxCxHxW"),
        ("2x0x4x4", "feature", "NxCxHxW"),
        ("resnet50", "lipschitz", "resnet18"),
        ("8x16:fp8", "kd", "dtype"),
    ],
)
def test_bad_specs_say_the_form(spec, op, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_spec(spec, op)


@pytest.mark.parametrize(
    "op, shapes",
    [
        ("feature", ["2x3x4x4"]),
        ("lipschitz", None),
        ("linear", ["8x4x16"]),
        ("overhead", ["4x10"]),
        ("topk", ["4x16x3"]),
    ],
)
def test_run_checks_agreement_and_writes_json(tmp_path, monkeypatch, op, shapes):
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", lambda device: 30.0)  # measuring it copies 1 GiB
    path = tmp_path / "bench.json"
    lines = []
    report = bench.run(shapes, op=op, device="cpu", reps=1, json_path=str(path), log=lines.append)
    results = json.loads(path.read_text())["results"][op]
    assert results == report["results"][op]
    assert any(r["implementation"].startswith("fastkd") for r in results)
    assert all(r["within_tolerance"] for r in results), results
    assert "fastkd" in lines[-1]


def test_all_ops_take_no_shapes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--op", "all", "--shapes", "8x16"])
    assert "--op all runs each op's default shapes" in capsys.readouterr().err


def test_plot_draws_every_op_of_a_report(tmp_path):
    pytest.importorskip("matplotlib")
    result = dict(
        implementation="fastkd",
        forward_ms=1.0,
        forward_backward_ms=2.0,
        graph_ms=None,
        peak_extra_mib=0.0,
        roofline_pct=50.0,
        max_rel_error=1e-7,
        within_tolerance=True,
        note="",
    )
    report = {
        "environment": {"device": "cpu"},
        "results": {
            "kd": [
                dict(result, shape="256x100"),
                dict(result, shape="1024x1000", forward_backward_ms=3.0),
                dict(result, shape="1024x1000", implementation="torch eager", forward_backward_ms=9.0),
            ],
            "feature": [dict(result, shape="2x3x4x4:fp32")],
            "lipschitz": [dict(result, shape="resnet18:fp32", forward_backward_ms=None)],
        },
    }
    path = tmp_path / "bench.png"
    bench.plot(report, str(path))
    assert path.stat().st_size > 10_000


@pytest.mark.parametrize(
    "shapes, expected",
    [(None, ["resnet18:bf16"]), (["resnet18"], ["resnet18:bf16"]), (["resnet18:fp32"], ["resnet18:fp32"])],
)
def test_dtype_applies_to_default_shapes_and_to_shapes_without_one(monkeypatch, shapes, expected):
    seen = []
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", lambda device: 30.0)
    monkeypatch.setattr(bench, "bench_lipschitz", lambda spec, *args: seen.append(spec) or [])
    bench.run(shapes, op="lipschitz", device="cpu", dtype="bf16", log=lambda line: None)
    assert seen == expected


def test_the_topk_op_reports_the_teacher_cache(monkeypatch):
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", lambda device: 30.0)
    lines = []
    report = bench.run(["4x16x3"], op="topk", device="cpu", reps=1, log=lines.append)
    (figures,) = report["teacher_cache"]
    assert figures["vocab_size"] == 16 and figures["k"] == 3
    assert 3 * (2 + 2) + 2 <= figures["bytes_per_token"] <= 3 * (2 + 2) + 2 + 1  # values, indices, counts (+ headers)
    assert any("TeacherCache V=16 k=3" in line for line in lines)


def test_the_relational_op_checks_agreement_first(monkeypatch, capsys):
    from fastkd import bench_relational

    monkeypatch.setattr(bench_relational, "RKD_SHAPE", (12, 5))
    monkeypatch.setattr(bench_relational, "CRD_SHAPE", (4, 20, 8, 100))
    monkeypatch.setattr(bench_relational, "CRD_LARGE_SAMPLES", 400)  # past 8·(K+1): the gather-dot kernels
    monkeypatch.setattr(bench_relational, "_peak_mb", lambda name, device: 1.0)  # a fresh process per step
    monkeypatch.setattr(bench_relational.torch, "compile", lambda fn: fn)  # compiling takes a minute on CPU
    result = bench_relational.run("cpu", reps=1)
    assert all(value < 1e-4 for value in result["agreement"].values()), result["agreement"]
    crd = {"crd fastkd", "crd eager", "crd fastkd large N", "crd eager large N"}
    assert set(result["ms"]) == {"rkd fastkd", "rkd eager", "rkd torch.compile"} | crd
    assert "rkd fastkd" in capsys.readouterr().out
