# Source this (`. scripts/gpu/env.sh`) to build the CUDA trainer on a machine with
# no GPU and no CUDA install: it fetches NVIDIA's CUDA 13.0 compiler and headers
# from PyPI (the nvidia-* wheels, ~105 MB, once, into target/cuda-toolkit) and
# exports what the build needs (nvcc on PATH, CUDA_HOME, CUDA_COMPUTE_CAP, a
# linker path holding libcudart.so).
#
# Why 13.0 and not the newest: candle's kernels are compiled to PTX here and
# JIT-compiled by the GPU's driver there, which refuses PTX newer than itself. The
# lent H100/H200 machines run driver 580, whose CUDA is 13.0.
# Why no libraries: cudarc loads libcuda, cuBLAS, cuRAND, NVRTC and cuDNN at run
# time (its `dynamic-loading` feature, third_party/README.md); only libcudart is
# linked (candle-kernels' static kernels need it).
#
# Env: CUDA_COMPUTE_CAP (default 90: Hopper, the H100 and H200), MODKIT_CUDA_ROOT
# (default target/cuda-toolkit), PYTHON (default python3, with pip).

_modkit_gpu_env() {
    local repo root wheels py cu v
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    root=${MODKIT_CUDA_ROOT:-$repo/target/cuda-toolkit}
    cu=$root/root/nvidia/cu13
    py=${PYTHON:-python3}
    if [ ! -x "$cu/bin/nvcc" ] || [ ! -e "$root/.complete" ]; then
        wheels=$root/wheels
        mkdir -p "$wheels"
        echo "scripts/gpu/env.sh: fetching CUDA 13.0 (nvcc, headers, libcudart) from PyPI into $root…" >&2
        "$py" -m pip download -q --no-deps --only-binary=:all: -d "$wheels" \
            nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
            nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2 \
            || { echo "scripts/gpu/env.sh: pip could not fetch the CUDA wheels" >&2; return 1; }
        rm -rf "$root/root"
        for v in "$wheels"/*.whl; do
            "$py" -m zipfile -e "$v" "$root/root" || return 1
        done
        chmod +x "$cu"/bin/* "$cu"/nvvm/bin/*
        mkdir -p "$root/link"
        ln -sf "$cu/lib/libcudart.so.13" "$root/link/libcudart.so"
        touch "$root/.complete"
    fi
    export CUDA_HOME=$cu CUDA_PATH=$cu
    case ":$PATH:" in *":$cu/bin:"*) ;; *) export PATH=$cu/bin:$PATH ;; esac
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
    export LIBRARY_PATH=$root/link${LIBRARY_PATH:+:$LIBRARY_PATH}
    # To run the binaries here (no GPU: `--device cuda` says so and stops).
    export LD_LIBRARY_PATH=$cu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}
_modkit_gpu_env
