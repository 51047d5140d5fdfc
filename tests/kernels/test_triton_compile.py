"""Compile every Triton kernel launch for sm_80 and sm_90 without a GPU and check its resources.

The interpreter tests accept code that the Triton compiler rejects or that spills. This file
compiles what the launchers actually launch, as recorded by ``bench.kernel_compile``, so a
change of block size, dtype or launch option in ``kernels/`` changes what compiles here. Each
specialization must give a cubin that spills no register and whose shared memory fits one
thread block of the target. The file skips itself under TRITON_INTERPRET=1 and when Triton's
NVIDIA backend or its ptxas or cuobjdump is missing.
"""

import pytest
from triton.runtime.jit import JITFunction

from bench import kernel_compile

_REASON = kernel_compile.missing_toolchain()
if _REASON is not None:
    pytest.skip(f"cannot compile Triton kernels: {_REASON}", allow_module_level=True)

LAUNCHES = kernel_compile.record_launches()


def launch_id(launch: kernel_compile.Launch) -> str:
    return f"{launch.name.strip('_')} {launch.variant} {launch.blocks}".replace(" ", "-")


def test_cases_launch_every_kernel():
    # Kernel names end in "_kernel". The other JITFunctions are helpers called inside kernels.
    defined = {name for module in kernel_compile.KERNEL_MODULES
               for name, value in vars(module).items()
               if isinstance(value, JITFunction) and name.endswith("_kernel")}
    launched = {launch.name for launch in LAUNCHES}
    assert launched == defined, f"never launched by the recorded cases: {defined - launched}"


@pytest.mark.slow  # about 60 s on 2 CPU cores with an empty Triton cache, a few s when warm
@pytest.mark.parametrize("arch", sorted(kernel_compile.TARGET_NAMES), ids="sm_{}".format)
@pytest.mark.parametrize("launch", LAUNCHES, ids=launch_id)
def test_kernel_compiles_without_spills(launch, arch):
    resources = kernel_compile.measure(launch, arch)
    summary = "\n" + kernel_compile.format_table([resources])
    assert resources.cubin_bytes > 0, f"empty cubin{summary}"
    assert resources.spill_bytes == 0, f"spills registers to local memory{summary}"
    limit = kernel_compile.MAX_SHARED_BYTES[arch]
    assert resources.shared_bytes <= limit, f"shared memory above {limit} bytes{summary}"
    registers = resources.registers * resources.num_warps * kernel_compile.WARP_SIZE
    assert registers <= kernel_compile.MAX_REGISTERS_PER_BLOCK, (
        f"{registers} registers per block{summary}")
