"""Every test process sees 8 fake CPU devices (docs/architecture.md: 'How things are proved without an accelerator').

Test speed: most of the suite's time is XLA compiling small programs on 2 cores. So the tests compile with the
backend's LLVM optimisation off (``--xla_backend_optimization_level=0``: 2-3x faster compiles; the tiny models' run
time hardly matters, and every oracle is computed in the same process or under the same flags), and one persistent
compilation cache, fresh for each session, is shared by this process and the train.py subprocesses it starts
(``subprocess_env.child_env``), so a program compiled again (a resumed run, a reference run) compiles once.
"""
import os
import shutil
import tempfile

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
# XLA:CPU's newer fusion emitters take ~3x longer to compile a tiny training step than the classic ones (22 s vs 7 s,
# vlm_tiny data=8, 2026-12-07); the tests' programs are tiny, so compile time is what counts. XLA aborts on a flag it
# does not know, so the flag is set only where the installed jaxlib has it.
FUSION_EMITTERS_OFF = "--xla_cpu_use_fusion_emitters=false"


def _jaxlib_knows(flag_name: str) -> bool:
    """The flag's name is compiled into one of jaxlib's shared libraries (read without importing jax, whose flags
    must be set first)."""
    import glob
    import importlib.util
    import mmap

    spec = importlib.util.find_spec("jaxlib")
    for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "*.so")) if spec and spec.origin else []:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(flag_name.encode()) >= 0:
                return True
    return False


_flags = os.environ.get("XLA_FLAGS", "")
_wanted = ["--xla_force_host_platform_device_count=8", TEST_XLA_FLAGS]
if "xla_cpu_use_fusion_emitters" not in _flags and _jaxlib_knows("xla_cpu_use_fusion_emitters"):
    _wanted.append(FUSION_EMITTERS_OFF)
os.environ["XLA_FLAGS"] = " ".join(  # idempotent: pytest-xdist's workers inherit the flags already set
    [_flags] + [f for f in _wanted if f not in _flags]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Made by the first process (pytest-xdist's workers and the subprocesses inherit it), removed by it at the end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mllm_jax_tests_xla_cache_")
# Cache every program, not only those compiling for over a second (jax's default): the many small ones (init, eval,
# placement) recur in every training run of the suite (test_train_init_from.py: 7% less CPU, 2026-12-06).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# Longest files first (pytest.ini's --dist loadfile --no-loadscope-reorder hands whole files to the two workers in
# this order): the greedy longest-first order keeps a long file from starting last and running alone at the end.
# Seconds per file from `--durations=0` summed by file (2026-12-06, 2 cores under load; only the order matters).
# Files not listed count as 5 s and keep their collection order behind the listed ones.
FILE_SECONDS = {
    "pipeline_llm": 230, "pipeline_compile": 40, "compile_families": 201, "train_parallel": 171,
    "train_long_sequences": 132,
    "compile_families_gpu": 115, "distributed_train": 110, "moe_parallel": 108, "compile_target": 100,
    "kernels_tiled": 97, "kernels_pallas_tpu": 97, "train_cli": 93, "faults_train": 87, "native_model": 81,
    "faults_kill": 77, "generate": 73, "sharding": 65, "datasets_native": 65, "encoder_cache": 63,
    "benchmark_throughput": 60, "context_integration": 59, "generate_cli": 57, "context_pipeline": 55,
    "generate_sharded": 53, "encoder_balance": 52, "moe": 49, "train": 48, "train_init_from": 48,
    "context_attention": 45, "hf_recipe": 40, "mrope": 40, "kernels_pallas_gpu": 36, "train_datasets": 33,
    "encoder_cache_real": 33, "hf": 33, "model_multimodal": 24, "pipeline_schedule": 24, "pipeline": 23,
    "context_encoders": 21, "kernels_meta": 20, "notebook": 20, "hf_qwen2vl": 17, "native_vision": 17,
    "faults_misc": 15, "model_stacking": 14, "hf_moe": 13, "hf_gemma3": 11, "model_llm": 11,
}


def pytest_collection_modifyitems(config, items):
    def seconds(item):
        name = os.path.basename(str(item.path))
        return FILE_SECONDS.get(name[len("test_"):-len(".py")], 5)

    items.sort(key=lambda item: -seconds(item))  # stable: tests keep their order inside a file
