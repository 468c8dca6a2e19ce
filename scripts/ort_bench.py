"""Median latency of one ONNX model in onnxruntime, batch 1, for scripts/compare_ort.sh.

Usage: ort_bench.py MODEL.onnx THREADS RUNS  ->  one JSON line:
{"threads": T, "runs": R, "median_ms": M, "version": "..."}
"""
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def main():
    path, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in inp.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(3):
        sess.run(None, {inp.name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {inp.name: x})
        times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"threads": threads, "runs": runs,
                      "median_ms": statistics.median(times), "version": ort.__version__}))


if __name__ == "__main__":
    main()
