"""Log diagnosis: every captured failure line maps to a named cause and a remedy, with the numbers a remedy needs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.logdiag import SIGNATURES, diagnose, match_line
from tests.helpers import FIXTURES


def _blocks() -> dict[str, list[str]]:
    """The fixture's blocks: title -> the verbatim engine lines (cause/remedy notes and comments left out)."""
    blocks: dict[str, list[str]] = {}
    title = None
    for line in (FIXTURES / "engine-log-signatures.txt").read_text().splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            blocks[title] = []
        elif title and line.strip() and not line.startswith(("cause:", "remedy:", "#")):
            blocks[title].append(line)
    return blocks


BLOCKS = _blocks()

EXPECTED = {
    "vllm: port taken": "port_in_use",
    "vllm: not enough free GPU memory at start": "vllm.gpu_memory_insufficient",
    "vllm: KV cache cannot hold max_model_len": "vllm.kv_cache_too_small",
    "vllm: illegal memory access": "cuda.illegal_memory_access",
    "vllm: unsupported architecture (old version)": "vllm.unsupported_architecture",
    "vllm: wrapper line (look above it for the real cause)": "vllm.engine_core_init_failed",
    "mlx / metal: out of memory": "metal.out_of_memory",
    "mlx / metal: GPU hang (precedes stranded wired memory)": "metal.gpu_hang",
    "mlx / metal: innocent victim of another GPU error": "metal.innocent_victim",
    "mlx / metal: command buffer ran too long (watchdog, not OOM)": "metal.impacting_interactivity",
    "mlx / metal: submissions ignored after repeated GPU errors": "metal.submissions_ignored",
    "mlx: model near the recommended working set": "mlx.near_wired_limit",
    "mlx_lm: model folder without weights": "model.safetensors_missing",
    "mlx_lm: model path that does not exist": "model.invalid_repo_id",
    "llama.cpp: CUDA out of memory": "llamacpp.cuda_out_of_memory",
    "llama.cpp: metal command buffer failure": "metal.out_of_memory",
    "ollama: model too large for memory": "ollama.insufficient_system_memory",
    "ollama: runner died": "ollama.runner_terminated",
    "ollama: runner out of memory during startup": "ollama.runner_out_of_memory",
    "vllm: no memory left for the KV cache": "vllm.no_cache_memory",
    "vllm: not enough free GPU memory at start (older, no device name)": "vllm.gpu_memory_insufficient",
}


def test_every_fixture_block_has_an_expectation() -> None:
    """No captured signature block is left untested (a new block in the fixture must be added here)."""
    assert set(BLOCKS) == set(EXPECTED)


@pytest.mark.parametrize("title", sorted(EXPECTED))
def test_fixture_block_is_diagnosed(title: str) -> None:
    """Each captured failure block yields its named cause, a non-empty remedy and the line that matched."""
    diagnosis = diagnose(BLOCKS[title])
    assert diagnosis is not None
    assert diagnosis.signature == EXPECTED[title]
    assert diagnosis.cause and diagnosis.remedy
    assert diagnosis.line in BLOCKS[title]
    assert "{" not in diagnosis.cause and "}" not in diagnosis.cause


@pytest.mark.parametrize("title", sorted(EXPECTED))
def test_every_line_of_a_block_is_recognised_on_its_own(title: str) -> None:
    """Each verbatim line is recognised alone (engines often print only one of a block's lines)."""
    for line in BLOCKS[title]:
        assert match_line(line), line


def test_metal_status_line_alone_is_a_command_buffer_failure() -> None:
    """llama.cpp's 'command buffer N failed with status 5' alone names a Metal command buffer failure, with its status."""
    diagnosis = diagnose(["ggml_metal_graph_compute: command buffer 3 failed with status 5"])
    assert diagnosis.signature == "llamacpp.metal_command_buffer_failed"
    assert diagnosis.details == {"buffer": 3, "status": 5}


@pytest.mark.parametrize("line", [
    "ggml_metal_synchronize: error: command buffer 0 failed with status 5",
    "0.00.615.712 E llama_init_from_model: failed to initialize the context: failed to allocate buffer for kv cache",
    "0.00.605.310 E alloc_tensor_range: failed to allocate CUDA0 buffer of size 524288000000",
    "llama_model_load: error loading model: unable to allocate CUDA0 buffer",
])
def test_current_llamacpp_failure_lines_alone_are_diagnosed(line: str) -> None:
    """Each of today's llama.cpp out-of-memory / Metal failure lines alone gets a llama.cpp diagnosis."""
    diagnosis = diagnose([line])
    assert diagnosis is not None and diagnosis.signature.startswith("llamacpp."), diagnosis


def test_kv_cache_remedy_names_the_max_model_len_that_fits() -> None:
    """The KV-cache failure captures vLLM's estimate and tells the exact flag to use: --max-model-len 157216."""
    diagnosis = diagnose(BLOCKS["vllm: KV cache cannot hold max_model_len"])
    assert diagnosis.details == {
        "max_model_len": 262144, "needed_gib": 16.0, "available_gib": 9.6, "estimated_max_model_len": 157216,
    }
    assert "--max-model-len 157216" in diagnosis.remedy
    assert "262144" in diagnosis.cause and "9.6 GiB" in diagnosis.cause


def test_older_vllm_kv_cache_wording_is_understood() -> None:
    """Older vLLM's 'larger than the maximum number of tokens that can be stored in KV cache (N)' gives N as the estimate."""
    line = (
        "ValueError: The model's max seq len (32768) is larger than the maximum number of tokens that can be "
        "stored in KV cache (20000). Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine."
    )
    diagnosis = diagnose([line])
    assert diagnosis.signature == "vllm.kv_cache_too_small"
    assert diagnosis.details["estimated_max_model_len"] == 20000
    assert "--max-model-len 20000" in diagnosis.remedy


def test_gpu_memory_numbers_and_a_utilization_that_fits() -> None:
    """Free/total/desired GiB are captured and the remedy suggests a --gpu-memory-utilization that fits the free memory."""
    diagnosis = diagnose(BLOCKS["vllm: not enough free GPU memory at start"])
    assert diagnosis.details == {"device": "cuda:0", "free_gib": 7.34, "total_gib": 15.49, "utilization": 0.8, "desired_gib": 12.39}
    assert "at most 0.47" in diagnosis.remedy  # 7.34 / 15.49 = 0.4738...
    assert "7.34 GiB of 15.49 GiB" in diagnosis.cause


def test_older_ollama_memory_numbers_and_llamacpp_allocation() -> None:
    """An older Ollama's required/available GiB and llama.cpp's failed MiB allocation are captured as numbers and named in the text."""
    ollama = diagnose(["Error: model requires more system memory (164.8 GiB) than is available (13.4 GiB)"])
    assert ollama.signature == "ollama.insufficient_system_memory"
    assert ollama.details == {"required_gib": 164.8, "available_gib": 13.4}
    assert "164.8 GiB" in ollama.cause and "13.4 GiB" in ollama.cause
    llama = diagnose(BLOCKS["llama.cpp: CUDA out of memory"])
    assert llama.details == {"mib": 500000.0, "device": 0, "bytes": 524288000000}
    assert "ggml_backend_cuda_buffer_type_alloc_buffer" in llama.line
    assert "500000.00 MiB" in llama.remedy or "500000.0 MiB" in llama.remedy


def test_llamacpp_buffer_line_alone_falls_back_to_a_remedy_without_numbers() -> None:
    """Only the 'unable to allocate backend buffer' line: the same cause, with a remedy that needs no numbers."""
    diagnosis = diagnose(["llama_model_load: error loading model: unable to allocate backend buffer"])
    assert diagnosis.signature == "llamacpp.cuda_out_of_memory"
    assert diagnosis.details == {}
    assert "{" not in diagnosis.remedy and "-ngl" in diagnosis.remedy


def test_vllm_wrapper_defers_to_the_real_cause_above() -> None:
    """vLLM's 'Engine core initialization failed. See root cause above' yields to the KV-cache error printed above it."""
    log = [
        "(EngineCore_DP0 pid=51234) ERROR 06-01 10:00:00 [core.py:700] EngineCore failed to start.",
        "(EngineCore_DP0 pid=51234) ERROR 06-01 10:00:00 [core.py:700] " + BLOCKS["vllm: KV cache cannot hold max_model_len"][0],
        "(APIServer pid=51200) " + BLOCKS["vllm: wrapper line (look above it for the real cause)"][0],
    ]
    diagnosis = diagnose(log)
    assert diagnosis.signature == "vllm.kv_cache_too_small"
    assert diagnosis.details["estimated_max_model_len"] == 157216


@pytest.mark.parametrize("real", ["mlx / metal: GPU hang (precedes stranded wired memory)", "mlx / metal: out of memory"])
@pytest.mark.parametrize("victim_first", [True, False])
def test_innocent_victim_defers_to_a_hang_or_oom(real: str, victim_first: bool) -> None:
    """The Metal 'innocent victim' line never hides the hang or out-of-memory that caused it, whichever comes first."""
    victim = BLOCKS["mlx / metal: innocent victim of another GPU error"]
    ignored = BLOCKS["mlx / metal: submissions ignored after repeated GPU errors"]
    log = victim + ignored + BLOCKS[real] if victim_first else BLOCKS[real] + victim + ignored
    assert diagnose(log).signature == EXPECTED[real]


def test_near_limit_warning_yields_to_the_oom_that_followed() -> None:
    """mlx's 'close to the maximum recommended size' warning is overruled by the Metal OOM that followed it."""
    log = BLOCKS["mlx: model near the recommended working set"] + BLOCKS["mlx / metal: out of memory"]
    assert diagnose(log).signature == "metal.out_of_memory"


def test_first_of_equal_causes_wins() -> None:
    """Between two equally specific causes the earlier line wins (later errors are usually consequences)."""
    log = BLOCKS["mlx / metal: GPU hang (precedes stranded wired memory)"] + BLOCKS["mlx / metal: out of memory"]
    assert diagnose(log).signature == "metal.gpu_hang"


def test_ollama_runner_reason_is_kept() -> None:
    """Ollama's dead runner is named with its reason (without the log's closing quote), not mistaken for a generic CUDA out-of-memory."""
    diagnosis = diagnose(BLOCKS["ollama: runner died"])
    assert diagnosis.details == {"reason": "exit status 2: CUDA error: out of memory"}
    assert "(exit status 2: CUDA error: out of memory)" in diagnosis.cause
    older = diagnose(["Error: llama runner process has terminated: CUDA error: out of memory"])
    assert older.signature == "ollama.runner_terminated" and older.details == {"reason": "CUDA error: out of memory"}


def test_mlx_lm_dead_generation_thread_names_its_reason_when_nothing_more_specific_is_known() -> None:
    """mlx_lm.server's 'generation thread died: <reason>' is named with its reason, and yields to a specific cause beside it."""
    line = "2026-11-30 14:06:29,286 - ERROR - mlx_lm.server generation thread died: std::bad_alloc"
    alone = diagnose([line])
    assert alone.signature == "mlx_lm.generation_thread_died" and alone.details == {"reason": "std::bad_alloc"}
    assert "(std::bad_alloc)" in alone.cause
    assert diagnose(BLOCKS["mlx_lm: model folder without weights"]).signature == "model.safetensors_missing"


def test_older_vllm_free_memory_line_without_a_device() -> None:
    """vLLM's older free-memory line (no device name) is still diagnosed with its numbers and a utilization that fits."""
    diagnosis = diagnose(BLOCKS["vllm: not enough free GPU memory at start (older, no device name)"])
    assert diagnosis.details == {"free_gib": 7.34, "total_gib": 15.49, "utilization": 0.9, "desired_gib": 13.94}
    assert "7.34 GiB of 15.49 GiB is free on the GPU" in diagnosis.cause
    assert "at most 0.47" in diagnosis.remedy


def test_vllm_info_line_about_free_memory_is_not_a_failure() -> None:
    """vLLM's startup info line suggesting --kv-cache-memory (vllm/v1/worker/gpu_worker.py) is not diagnosed as a memory failure."""
    line = ("(EngineCore_DP0 pid=51234) INFO 11-30 14:02:11 [gpu_worker.py:1068] Free memory on device (78.5/79.2 GiB) "
            "on startup. Desired GPU memory utilization is (0.9, 71.3 GiB). Actual usage is 14.9 GiB for consumed memory")
    assert diagnose([line]) is None


@pytest.mark.parametrize(
    ("line", "signature", "details"),
    [
        # captured from mlx_lm 0.32 given a directory without weights, and a path that does not exist
        ("FileNotFoundError: No safetensors found in /models/Qwen3-4B-4bit", "model.safetensors_missing", {"path": "/models/Qwen3-4B-4bit"}),
        (
            "huggingface_hub.errors.HFValidationError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': "
            "'/tmp/nonexistent-model'. Use `repo_type` argument if needed.",
            "model.invalid_repo_id",
            {"path": "/tmp/nonexistent-model"},
        ),
        (
            "FileNotFoundError: [Errno 2] No such file or directory: '/models/GLM-4.6/model-00007-of-00012.safetensors'",
            "model.file_not_found",
            {"path": "/models/GLM-4.6/model-00007-of-00012.safetensors"},
        ),
        ("ValueError: Missing 24 parameters: model.layers.23.mlp.gate_proj.weight, ...", "model.missing_parameters", {"count": 24}),
        ("ModuleNotFoundError: No module named 'mlx_lm'", "python.module_not_found", {"module": "mlx_lm"}),
        ("/usr/bin/python3: No module named vllm", "python.module_not_found", {"module": "vllm"}),
        ("RuntimeError: Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed a driver", "cuda.no_device", {}),
        ("RuntimeError: CUDA error: no CUDA-capable device is detected", "cuda.no_device", {}),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB", "cuda.out_of_memory", {"tried_gib": 2.0}),
        ("Error: listen tcp 127.0.0.1:11434: bind: address already in use", "port_in_use", {}),
        ("main: couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 8080", "port_in_use", {}),
        ("OSError: [Errno 48] Address already in use", "port_in_use", {}),  # macOS errno
    ],
)
def test_more_signatures_users_hit(line: str, signature: str, details: dict) -> None:
    """Common start failures beyond the fixture (missing weights, missing package, no GPU, port taken) are named."""
    diagnosis = diagnose([line])
    assert diagnosis is not None and diagnosis.signature == signature
    assert diagnosis.details == details
    assert "{" not in diagnosis.remedy


def test_traceback_source_lines_are_not_the_message() -> None:
    """The source line a traceback shows (`raise ...(f"... {model_path}")`) is skipped; the message line below it is used."""
    log = [
        '  File "/venv/lib/python3.11/site-packages/mlx_lm/utils.py", line 452, in load_model',
        '    raise FileNotFoundError(f"No safetensors found in {model_path}")',
        "FileNotFoundError: No safetensors found in /models/x",
    ]
    assert diagnose(log).details == {"path": "/models/x"}
    assert diagnose(log[:2]) is None


def test_module_not_found_names_the_package_to_install() -> None:
    """A missing mlx_lm module tells to install the mlx-lm package (the distribution name, not the module)."""
    diagnosis = diagnose(["ModuleNotFoundError: No module named 'mlx_lm'"])
    assert "pip install mlx-lm" in diagnosis.remedy


def test_ordinary_output_gives_no_diagnosis() -> None:
    """Normal startup output, and nothing at all, give no diagnosis."""
    normal = [
        "2026-11-25 09:05:18,164 - INFO - Starting httpd at 127.0.0.1 on port 8080...",
        "INFO:     Application startup complete.",
        "llama_model_loader: loaded meta data with 33 key-value pairs",
    ]
    assert diagnose(normal) is None
    assert diagnose([]) is None


def test_signature_ids_are_unique_and_dotted() -> None:
    """Signature ids are stable identifiers: unique, lower-case, and every signature has a cause and remedy."""
    ids = [s.id for s in SIGNATURES]
    assert len(ids) == len(set(ids))
    for signature in SIGNATURES:
        assert signature.id == signature.id.lower() and " " not in signature.id
        assert signature.cause and signature.remedy


@settings(max_examples=60)
@given(st.lists(st.text(max_size=300), max_size=20))
def test_diagnose_never_raises_on_arbitrary_output(lines: list[str]) -> None:
    """Whatever an engine prints, diagnosis returns a result or None and never raises."""
    result = diagnose(lines)
    assert result is None or result.signature in {s.id for s in SIGNATURES}


@pytest.mark.slow
def test_real_mlx_lm_output_without_weights_is_diagnosed(tmp_path: Path) -> None:
    """The real mlx_lm, pointed at a model directory without weights, prints a failure diagnosed as missing safetensors."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    done = subprocess.run(
        [sys.executable, "-m", "mlx_lm.generate", "--model", str(tmp_path), "--prompt", "hi", "--max-tokens", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    diagnosis = diagnose(done.stderr.splitlines())
    assert diagnosis is not None and diagnosis.signature == "model.safetensors_missing"
    assert diagnosis.details["path"] == str(tmp_path)


def test_real_python_without_the_engine_package_is_diagnosed() -> None:
    """Starting an engine module that is not installed gives the real 'No module named' line, diagnosed with the package."""
    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here; running it would start a real server")
    done = subprocess.run([sys.executable, "-m", "sglang.launch_server"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    diagnosis = diagnose(done.stderr.splitlines())
    assert diagnosis.signature == "python.module_not_found"
    assert diagnosis.details["module"].split(".")[0] == "sglang"
    assert "pip install sglang" in diagnosis.remedy


def _match_each_pattern(line: str) -> list[str]:
    """What the signatures match when each pattern is searched on its own (no combined prefilter)."""
    from probes.logdiag import _SOURCE_LINE

    if _SOURCE_LINE.search(line):
        return []
    return [s.id for s in SIGNATURES if s.match(line) is not None]


@settings(max_examples=200)
@given(st.sampled_from([line for lines in BLOCKS.values() for line in lines]), st.text(max_size=40),
       st.text(max_size=40))
def test_the_combined_prefilter_finds_every_line_a_signature_knows(line: str, before: str, after: str) -> None:
    """A known failure line is diagnosed the same whether or not ordinary output surrounds it on its line."""
    framed = before + line + after
    assert [s.id for s, _ in match_line(framed)] == _match_each_pattern(framed)


def test_access_log_lines_are_passed_over() -> None:
    """An engine's access log and progress lines (most of what a busy engine writes) diagnose as nothing."""
    lines = ['127.0.0.1 - - [30/Nov/2026 17:20:00] "POST /v1/chat/completions HTTP/1.1" 200 -',
             "Prompt processing progress: 10/10", "INFO:     127.0.0.1:5 - \"GET /health HTTP/1.1\" 200 OK"]
    assert all(match_line(line) == [] == _match_each_pattern(line) for line in lines)
    assert diagnose(lines * 100) is None
