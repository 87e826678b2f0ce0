"""The build and its runtime settings: SIMD dispatch, threads, `llmcore info`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import llmcore
from llmcore import _cpu, cli


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_info_reports_the_build():
    info = llmcore.info()
    assert info["version"]
    assert info["simd"] in info["simd_supported"]
    assert info["simd_supported"][0] == "generic"
    assert info["simd"] == info["simd_supported"][-1]  # the best level is chosen by default
    assert info["num_threads"] >= 1
    assert info["cuda_available"] is False or info["cuda_built"] is True


def test_cli_info_prints_text_and_json(capsys):
    assert cli.main(["info"]) == 0
    assert "simd" in capsys.readouterr().out
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["simd"] == llmcore.simd()


def test_environment_forces_a_lower_simd_level_and_threads():
    result = _python("import llmcore; print(llmcore.simd(), llmcore.get_num_threads())",
                     LLMCORE_SIMD="generic", LLMCORE_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["generic", "1"]


@pytest.mark.parametrize("env,message", [({"LLMCORE_SIMD": "sse9"}, "LLMCORE_SIMD"),
                                         ({"LLMCORE_NUM_THREADS": "many"}, "LLMCORE_NUM_THREADS")])
def test_bad_environment_gives_a_clear_error(env, message):
    result = _python("import llmcore", **env)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" in result.stderr


def test_set_simd_and_threads_validate():
    with pytest.raises(ValueError, match="unknown SIMD level"):
        llmcore.set_simd("sse9")
    with pytest.raises(ValueError):
        llmcore.set_num_threads(0)
    with pytest.raises(TypeError):
        llmcore.set_num_threads(1.5)


def test_every_simd_level_gives_the_same_answer(rng):
    x = rng.standard_normal((64, 300)).astype(np.float32)
    before = llmcore.simd()
    try:
        results = {}
        for level in _cpu.supported_simd():
            llmcore.set_simd(level)
            results[level] = (llmcore.ops.softmax(x), llmcore.ops.matmul(x, x.T))
    finally:
        llmcore.set_simd(before)
    base = results["generic"]
    for level, (sm, mm) in results.items():
        np.testing.assert_allclose(sm, base[0], rtol=1e-5, atol=1e-7, err_msg=level)
        np.testing.assert_allclose(mm, base[1], rtol=1e-4, atol=1e-3, err_msg=level)


def test_kernels_release_the_gil(rng, threads):
    # A pure-Python thread counts while one long kernel call runs. It keeps counting at its free
    # rate only if the kernel released the GIL; a kernel holding it would freeze the counter
    # for all but a switch interval (5 ms) of the call.
    import threading
    import time

    a = rng.standard_normal((1500, 1500)).astype(np.float32)
    llmcore.set_num_threads(1)  # leave the second core to the counting thread
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        before = counter[0]
        time.sleep(0.1)  # sleeping releases the GIL: the counter's free rate
        free_rate = (counter[0] - before) / 0.1
        before, start = counter[0], time.perf_counter()
        llmcore.ops.matmul(a, a)  # ~6.75 GFLOP: about 0.1 s on one core
        seconds = time.perf_counter() - start
        during = counter[0] - before
    finally:
        stop.set()
        t.join()
    assert seconds > 0.02
    assert during > 0.3 * free_rate * seconds, (during, free_rate, seconds)
