"""Gate logic: thresholds, which artifact is judged, and unmeasured gates failing."""

from __future__ import annotations

from pipeline.verify.gates import GatesConfig, evaluate_gates, gate_targets


def _row(artifact, backend, top1, agreement, p50, speed, size=2 * 1024 * 1024, rss=10.0, error=None):
    return {"artifact": artifact, "backend": backend, "size_bytes": size, "error": error,
            "accuracy": {"top1": top1, "agreement": agreement},
            "latency": {"1": {"p50_ms": p50, "ci95_ms": [p50 * 0.9, p50 * 1.1]}},
            "speedup": {"1": {"ratio": speed, "ci95": [speed * 0.9, speed * 1.1]}}, "memory": {"rss_delta_mb": rss}}


ROWS = [_row("original", "torch", 0.90, 1.0, 10.0, 1.0),
        _row("onnx_int8", "onnxruntime", 0.885, 0.97, 4.0, 2.5),
        _row("onnx_int8", "openvino", 0.86, 0.93, 3.0, 3.3)]


def test_accuracy_drop_judged_per_backend_of_the_target():
    gates = evaluate_gates(GatesConfig(max_accuracy_drop=0.02), ROWS, ["onnx_int8"])
    by = {g.artifact: g for g in gates}
    assert set(by) == {"onnx_int8@onnxruntime", "onnx_int8@openvino"}
    assert by["onnx_int8@onnxruntime"].passed and abs(by["onnx_int8@onnxruntime"].value - 0.015) < 1e-9
    assert not by["onnx_int8@openvino"].passed and abs(by["onnx_int8@openvino"].value - 0.04) < 1e-9


def test_min_and_max_directions_and_size_once_per_artifact():
    cfg = GatesConfig(min_speedup=3.0, max_latency_ms=3.5, min_agreement=0.95, max_size_mb=1.5)
    gates = evaluate_gates(cfg, ROWS, ["onnx_int8"])
    res = {(g.name, g.artifact): g.passed for g in gates}
    assert res[("min_speedup", "onnx_int8@onnxruntime")] is False
    assert res[("min_speedup", "onnx_int8@openvino")] is True
    assert res[("max_latency_ms", "onnx_int8@openvino")] is True
    assert res[("max_latency_ms", "onnx_int8@onnxruntime")] is False
    assert res[("min_agreement", "onnx_int8@openvino")] is False
    size = [g for g in gates if g.name == "max_size_mb"]
    assert len(size) == 1 and size[0].value == 2.0 and not size[0].passed


def test_threshold_equal_to_value_passes():
    gates = evaluate_gates(GatesConfig(min_speedup=2.5), ROWS, ["onnx_int8"])
    assert next(g for g in gates if g.artifact == "onnx_int8@onnxruntime").passed


def test_unmeasured_target_fails_with_reason():
    gates = evaluate_gates(GatesConfig(min_speedup=1.0, max_size_mb=10), ROWS, ["trt_int8"],
                           unmeasured={"trt_int8": "tensorrt: no CUDA"})
    assert len(gates) == 2 and all(not g.passed and g.value is None for g in gates)
    assert all("no CUDA" in g.detail for g in gates)


def test_no_labels_fails_accuracy_drop_and_errored_row_fails():
    rows = [_row("original", "torch", None, 1.0, 10, 1), _row("m", "torch", None, 0.99, 5, 2),
            _row("m", "onnxruntime", None, None, 1.0, 1.0, error="boom")]
    gates = evaluate_gates(GatesConfig(max_accuracy_drop=0.01), rows, ["m"])
    assert [g.passed for g in gates] == [False, False]
    assert "no labels" in gates[0].detail and "boom" in gates[1].detail


def test_no_thresholds_no_gates_and_targets():
    assert evaluate_gates(GatesConfig(), ROWS, ["onnx_int8"]) == []
    assert gate_targets(GatesConfig(), "onnx_int8", ["original", "onnx_int8"], "original") == ["onnx_int8"]
    assert gate_targets(GatesConfig(apply_to="all"), "x", ["original", "a", "a", "b"], "original") == ["a", "b"]
    assert gate_targets(GatesConfig(apply_to=["a"]), "x", [], "original") == ["a"]
