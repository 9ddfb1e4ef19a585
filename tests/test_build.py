"""The build machinery: the one source list, the CMake build, CUDA sources compiling without a GPU, the C++ unit
test of the framework-free headers."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_ARCHS = ["sm_80", "sm_90a"]


def load_setup_module():
    spec = importlib.util.spec_from_file_location("kestrel_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() only runs under __main__
    return module


def listed_sources():
    setup = load_setup_module()
    return setup.read_sources("cpu"), setup.read_sources("cuda")


def nvcc():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (shutil.which("nvcc"), os.path.join(cuda_home, "bin", "nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def test_sources_list_matches_disk():
    cpu, cuda = listed_sources()
    listed = cpu + cuda
    assert len(listed) == len(set(listed)), "a source is listed twice in csrc/sources.txt"
    missing = [p for p in listed if not (ROOT / p).is_file()]
    assert not missing, f"csrc/sources.txt lists files that do not exist: {missing}"
    on_disk = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "csrc").rglob("*")
        if p.suffix in (".cpp", ".cu") and "include" not in p.relative_to(ROOT / "csrc").parts
    )
    unlisted = sorted(set(on_disk) - set(listed))
    assert not unlisted, f"compiled sources missing from csrc/sources.txt: {unlisted}"
    assert all(p.endswith((".cu", ".cpp")) for p in cuda) and not any(p.endswith(".cu") for p in cpu)


def test_build_settings_written_once():
    """The flags and the default CUDA archs live in csrc/sources.txt, read by setup.py and CMakeLists.txt; the
    version in python/kestrel/_version.py; every C++ test in tests/cpp is built and registered with ctest."""
    setup = load_setup_module()
    assert "-ffp-contract=off" in setup.read_sources("cxx_flags")
    assert "--fmad=false" in setup.read_sources("nvcc_flags")
    assert setup.read_sources("cuda_archs") == ["8.0", "9.0a"]
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for literal in ("-ffp-contract=off", "--fmad=false", "-lineinfo", "0.1.0"):
        assert literal not in cmake, f"CMakeLists.txt spells {literal!r}: read it from csrc/sources.txt"
    setup_text = (ROOT / "setup.py").read_text()
    for literal in ("-ffp-contract=off", "--fmad=false", "-lineinfo"):
        assert literal not in setup_text, f"setup.py spells {literal!r}: read it from csrc/sources.txt"
    for test in (ROOT / "tests" / "cpp").glob("*.cpp"):
        assert f"tests/cpp/{test.name}" in cmake, f"{test.name} is not built by CMakeLists.txt (ctest)"
    assert cmake.count("add_test(") >= len(list((ROOT / "tests" / "cpp").glob("*.cpp")))


def test_device_code_never_includes_torch():
    for path in list((ROOT / "csrc" / "include").rglob("*")) + list((ROOT / "csrc").rglob("*.cu")):
        if path.is_file():
            text = path.read_text()
            for banned in ("<torch/", "<ATen/", "<c10/"):
                assert banned not in text, f"{path.relative_to(ROOT)} includes {banned}: keep torch out of device code"


def test_arch_names():
    setup = load_setup_module()
    assert setup.arch_names("8.0;9.0a") == "sm_80/sm_90a"
    assert setup.arch_names("8.0 9.0+PTX") == "sm_80/sm_90+PTX"


def test_cuda_decision(monkeypatch):
    setup = load_setup_module()
    for var in ("USE_CUDA", "FORCE_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("USE_CUDA", "0")
    assert setup.cuda_decision(torch) == (False, "USE_CUDA=0")
    monkeypatch.delenv("USE_CUDA")
    build, reason = setup.cuda_decision(torch)
    if torch.version.cuda is None:
        assert not build and "has no CUDA" in reason
    elif not torch.cuda.is_available():
        assert not build
        monkeypatch.setenv("FORCE_CUDA", "1")
        assert setup.cuda_decision(torch)[0] == (setup_cuda_home() is not None)


def setup_cuda_home():
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def test_header_unit_test(tmp_path):
    """tests/cpp/test_quantize_math.cpp: both searches against the definition, the sign fix, the helpers."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    from kestrel.functional import create_dynamic_map

    maps = tmp_path / "maps.bin"
    maps.write_bytes(
        torch.cat([create_dynamic_map(True), create_dynamic_map(False), create_dynamic_map(True, 3, 4)])
        .numpy()
        .tobytes()
    )
    binary = tmp_path / "test_quantize_math"
    subprocess.run(
        [
            compiler,
            "-O2",
            "-std=c++17",
            "-Wall",
            "-Werror",
            f"-I{ROOT / 'csrc' / 'include'}",
            str(ROOT / "tests" / "cpp" / "test_quantize_math.cpp"),
            "-o",
            str(binary),
        ],
        check=True,
    )
    result = subprocess.run([str(binary), str(maps)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failures" in result.stdout


@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_cuda_sources_compile(arch, tmp_path):
    """Every .cu source compiles for sm_80 and sm_90a with nvcc alone (device code never includes torch)."""
    compiler = nvcc()
    if compiler is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    _, cuda = listed_sources()
    kernels = [p for p in cuda if p.endswith(".cu")]
    assert kernels
    for source in kernels:
        out = tmp_path / (Path(source).stem + f"_{arch}.o")
        result = subprocess.run(
            [
                compiler,
                "-c",
                str(ROOT / source),
                "-o",
                str(out),
                "-O3",
                "-std=c++17",
                f"-gencode=arch=compute_{arch[3:]},code={arch}",
                f"-I{ROOT / 'csrc' / 'include'}",
                "-DKESTREL_CUDA_ARCHS=" + arch,
                "-Werror",
                "all-warnings",
            ]
            + load_setup_module().read_sources("nvcc_flags"),
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"{source} for {arch}:\n{result.stderr}"
        assert out.stat().st_size > 0


def test_cmake_build_matches_sources(tmp_path):
    """CMakeLists.txt reads csrc/sources.txt: its compile_commands.json holds exactly the [cpu] sources, and the
    module it builds registers the ops; the C++ unit tests pass under ctest."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    build = tmp_path / "build"
    # the CUDA-kernels-on-the-CPU tests (KESTREL_KERNEL_TESTS) have their own ctest run in .ci/run
    subprocess.run(
        [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build),
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DKESTREL_KERNEL_TESTS=OFF",
        ],
        check=True,
        capture_output=True,
    )
    commands = json.loads((build / "compile_commands.json").read_text())
    compiled = sorted(str(Path(c["file"]).resolve().relative_to(ROOT)) for c in commands)
    cpu, _ = listed_sources()
    assert compiled == sorted(cpu + ["tests/cpp/test_quantize_math.cpp"])
    flags = load_setup_module().read_sources("cxx_flags")  # the flags setup.py passes, from csrc/sources.txt
    assert flags
    for command in commands:
        words = command.get("command", " ".join(command.get("arguments", []))).split()
        missing = [f for f in flags if f not in words]
        assert not missing, f"the CMake build compiles {command['file']} without {missing}"
    jobs = os.environ.get("MAX_JOBS", "2")
    subprocess.run([cmake, "--build", str(build), "-j", jobs], check=True, capture_output=True)
    subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], check=True, capture_output=True)
    module = next(build.glob("_C*" + sysconfig.get_config_var("EXT_SUFFIX")))
    probe = (
        "import importlib.util, torch; "
        f"spec = importlib.util.spec_from_file_location('_C', {str(module)!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(m.build_info()['version'], torch.ops.kestrel.quantize_blockwise.default)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "kestrel.quantize_blockwise.default" in result.stdout
