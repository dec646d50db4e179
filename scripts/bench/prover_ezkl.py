#!/usr/bin/env python3
"""The EZKL side of scripts/bench/prover: one model, EZKL's default settings flow, each step timed.

Usage: prover_ezkl.py NAME MODEL.onnx DATA.json WORKDIR [PROVES] [PARAM_VISIBILITY]

DATA.json is the file scripts/bench/prover writes ({"calibration", "test_inputs", "float_argmax"}).
Steps: gen_settings -> calibrate_settings -> compile_circuit -> gen_srs (locally, with the logrows
that calibration chose: get_srs downloads and cannot work here) -> setup -> gen_witness -> prove
(PROVES times, default 3) -> verify (5 times). Visibility: input public, output public, params
PARAM_VISIBILITY (default "fixed": EZKL's default, weights baked into the circuit's fixed columns).
Prints one JSON line: the times in ms, logrows, proof size, peak RSS of this process (ru_maxrss).
"""
import asyncio
import inspect
import json
import os
import resource
import sys
import time

import ezkl

CALIBRATION_ROWS = 32


def call(f, *args, **kwargs):
    """Calls an ezkl function (some are async in some versions) and returns its result."""
    async def wait(a):
        return await a

    r = f(*args, **kwargs)
    if inspect.isawaitable(r):
        r = asyncio.run(wait(r))
    return r


def timed(f, *args, **kwargs):
    t = time.perf_counter()
    r = call(f, *args, **kwargs)
    return r, (time.perf_counter() - t) * 1000.0


def proof_bytes(path):
    """Size of the raw proof inside EZKL's JSON proof file."""
    with open(path) as fh:
        p = json.load(fh)
    raw = p.get("proof")
    if isinstance(raw, list):
        return len(raw)
    if isinstance(raw, str):
        h = raw[2:] if raw.startswith("0x") else raw
        return len(h) // 2
    h = p.get("hex_proof") or ""
    return len(h[2:] if h.startswith("0x") else h) // 2


def main():
    name, model, data_path, work = sys.argv[1:5]
    proves = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    visibility = sys.argv[6] if len(sys.argv) > 6 else "fixed"
    os.makedirs(work, exist_ok=True)
    with open(data_path) as fh:
        data = json.load(fh)
    cal = data["calibration"][:CALIBRATION_ROWS]
    x0 = data["test_inputs"][0]
    p = lambda f: os.path.join(work, f)  # noqa: E731
    with open(p("input.json"), "w") as fh:
        json.dump({"input_data": [x0]}, fh)
    with open(p("calibration.json"), "w") as fh:
        json.dump({"input_data": [[v for row in cal for v in row]]}, fh)

    run_args = ezkl.PyRunArgs()
    run_args.input_visibility = "public"
    run_args.output_visibility = "public"
    run_args.param_visibility = visibility
    run_args.variables = [("N", 1)]  # the ONNX files' batch dimension is named "N"

    t = {}
    ok, t["gen_settings_ms"] = timed(ezkl.gen_settings, model, p("settings.json"), py_run_args=run_args)
    assert ok, "gen_settings failed"
    ok, t["calibrate_ms"] = timed(ezkl.calibrate_settings, p("calibration.json"), model,
                                  p("settings.json"), "resources")
    assert ok, "calibrate_settings failed"
    ok, t["compile_ms"] = timed(ezkl.compile_circuit, model, p("model.compiled"), p("settings.json"))
    assert ok, "compile_circuit failed"
    with open(p("settings.json")) as fh:
        settings = json.load(fh)
    logrows = settings["run_args"]["logrows"]
    srs = p(f"kzg{logrows}.srs")
    _, t["gen_srs_ms"] = timed(ezkl.gen_srs, srs, logrows)
    ok, t["setup_ms"] = timed(ezkl.setup, p("model.compiled"), p("vk.key"), p("pk.key"), srs)
    assert ok, "setup failed"
    witness, t["gen_witness_ms"] = timed(ezkl.gen_witness, p("input.json"), p("model.compiled"),
                                         p("witness.json"), p("vk.key"), srs)
    prove_ms, prove_cpu_ms = [], []
    for _ in range(proves):
        cpu = time.process_time()
        _, ms = timed(ezkl.prove, p("witness.json"), p("model.compiled"), p("pk.key"),
                      p("proof.json"), srs)
        prove_ms.append(ms)
        prove_cpu_ms.append((time.process_time() - cpu) * 1000.0)
    verify_ms = []
    for _ in range(5):
        ok, ms = timed(ezkl.verify, p("proof.json"), p("settings.json"), p("vk.key"), srs)
        assert ok, "verify failed"
        verify_ms.append(ms)

    # EZKL's (rescaled) outputs for the proved row, against the float argmax.
    out = None
    try:
        scale = settings["model_output_scales"][0]
        felts = witness["outputs"][0] if isinstance(witness, dict) else None
        if felts is None:
            with open(p("witness.json")) as fh:
                felts = json.load(fh)["outputs"][0]
        out = [ezkl.felt_to_float(f, scale) for f in felts]
    except Exception as e:  # noqa: BLE001 - informative only
        print(f"note: could not read EZKL outputs: {e}", file=sys.stderr)

    print(json.dumps({
        "model": name, "onnx": model, "ezkl_version": getattr(ezkl, "__version__", "?"),
        "visibility": {"input": "public", "output": "public", "params": visibility},
        "logrows": logrows, "input_scale": settings["run_args"].get("input_scale"),
        "param_scale": settings["run_args"].get("param_scale"),
        "num_rows": settings.get("num_rows"),
        "total_assignments": settings.get("total_assignments"),
        "lookup_range": settings["run_args"].get("lookup_range"),
        "commitment": settings["run_args"].get("commitment"),
        **t,
        "prove_ms": prove_ms, "prove_ms_median": sorted(prove_ms)[len(prove_ms) // 2],
        "prove_cpu_ms_median": sorted(prove_cpu_ms)[len(prove_cpu_ms) // 2],
        "process_cpu_ms": time.process_time() * 1000.0,
        "verify_ms": verify_ms, "verify_ms_median": sorted(verify_ms)[len(verify_ms) // 2],
        "proof_bytes": proof_bytes(p("proof.json")),
        "proof_file_bytes": os.path.getsize(p("proof.json")),
        "vk_bytes": os.path.getsize(p("vk.key")), "pk_bytes": os.path.getsize(p("pk.key")),
        "row0_output": out,
        "row0_argmax": (max(range(len(out)), key=lambda i: out[i]) if out else None),
        "row0_float_argmax": data["float_argmax"][0],
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))


if __name__ == "__main__":
    main()
