"""`refslm devices`: list the OpenCL platforms and devices the opencl backend can choose from.

Indices are the ones REFSLM_OPENCL_DEVICE accepts ("PLATFORM:DEVICE"). Each device is probed with a
one-line kernel build, so a device whose compiler cannot target it is shown as unusable with the
reason. Exit status 0 if at least one device is usable, 1 otherwise (pyopencl missing, no platform,
or no device builds).
"""

from __future__ import annotations

import sys


def devices_arguments(parser) -> None:
    """No options: `refslm devices`."""
    parser.description = __doc__.splitlines()[0]


def devices_command(args) -> int:
    """Print one line per device and the one the backend picks by default; -> exit status."""
    from . import BackendUnavailable

    try:
        from . import opencl_backend as ocl
    except ImportError as exc:
        print(f"OpenCL unavailable: {exc}", file=sys.stderr)
        return 1
    found = ocl.list_devices()
    if not found:
        print("no OpenCL platform or device found (no ICD installed? Debian: apt-get install pocl-opencl-icd; "
              "NVIDIA: the driver's libnvidia-opencl and /etc/OpenCL/vendors/nvidia.icd)", file=sys.stderr)
        return 1
    usable = 0
    for p_index, d_index, platform, device in found:
        try:
            ocl.open_device(platform, device)
            state = "usable"
            usable += 1
        except BackendUnavailable as exc:
            state = "UNUSABLE: ..." + " ".join(str(exc).split())[-300:]
        print(f"{p_index}:{d_index}  {ocl.describe(platform, device)}  type={_kind(ocl.cl, device)} "
              f"compute_units={device.max_compute_units} global_mem={device.global_mem_size / 2**30:.1f}GiB "
              f"local_mem={device.local_mem_size // 1024}KiB fp64={'cl_khr_fp64' in device.extensions} "
              f"fp16={'cl_khr_fp16' in device.extensions}  [{state}]")
    try:
        platform, device, _ = ocl.select_device()
        print(f"default ({ocl.DEVICE_ENV} or first usable GPU, else first usable device): "
              f"{ocl.describe(platform, device)}")
    except BackendUnavailable as exc:
        print(f"no default device: {exc}", file=sys.stderr)
    return 0 if usable else 1


def _kind(cl, device) -> str:
    """'GPU' | 'CPU' | 'ACCELERATOR' | 'OTHER' from the device type bits."""
    for name in ("GPU", "ACCELERATOR", "CPU"):
        if device.type & getattr(cl.device_type, name):
            return name
    return "OTHER"
