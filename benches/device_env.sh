# Source on the GPU machine (from the repo root) before running tests or benchmarks there:
# installs the carried wheels (.whl: compressed-tensors and the peer loaders; .wheels: the
# fastfp8 abi3 wheel built here with `make wheel`) into /tmp/site and makes libcudart.so
# findable for fastsafetensors.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl .wheels/*.whl || return 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/cudart
ln -sf "$(python3 -c 'import nvidia.cu13 as m, os; print(os.path.join(list(m.__path__)[0], "lib", "libcudart.so.13"))' 2>/dev/null)" /tmp/cudart/libcudart.so
export LD_LIBRARY_PATH=/tmp/cudart:${LD_LIBRARY_PATH:-}
