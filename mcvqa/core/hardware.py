"""## Hardware: pick dtype and attention from what the GPU can do, and say why

T4 (compute capability 7.5) has no bf16 and no FlashAttention 2, so it computes in fp16 with a
gradient scaler; A100/H100 (8.0+) compute in bf16; a CPU computes in fp32. FlashAttention 2 is used
only when the `flash_attn` package is installed *and* the card supports it; otherwise PyTorch's
SDPA. The 4-bit layers compute in the same dtype. Every choice is printed with its reason.
"""

import contextlib
import dataclasses
import importlib.util

import torch

from .config import ConfigError


@dataclasses.dataclass
class Hardware:
    device: str  # "cuda" or "cpu"
    gpu_name: str
    gpu_count: int
    gpu_memory_gib: float  # per GPU
    compute_capability: tuple  # (major, minor); (0, 0) on CPU
    dtype: str  # compute dtype: float16 | bfloat16 | float32
    attn_implementation: str  # sdpa | flash_attention_2
    use_grad_scaler: bool  # fp16 needs loss scaling; bf16 and fp32 do not
    reasons: list
    memory_capped: bool = False  # gpu_memory_gib is a cap below the card's memory (apply_memory_cap enforces it)

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)


def describe_gpus():
    """What torch sees, as plain dicts (tests pass fakes of the same shape)."""
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"name": props.name, "capability": (props.major, props.minor),
                     "memory_gib": props.total_memory / 2**30})
    return gpus


def choose_hardware(gpus, dtype="auto", attn_implementation="auto", flash_attn_installed=None, memory_cap_gib=0.0):
    """Decide compute dtype and attention for a list of GPU descriptions (empty list: CPU).
    memory_cap_gib (> 0, below the card's memory): what this process may use per GPU, e.g. a T4's 15 GiB."""
    if flash_attn_installed is None:
        flash_attn_installed = importlib.util.find_spec("flash_attn") is not None
    reasons = []
    if not gpus:
        device, name, capability, memory = "cpu", "cpu", (0, 0), 0.0
        auto_dtype = "float32"
        reasons.append("no CUDA GPU: fp32 on the CPU (fp16/bf16 matmuls are slow or missing there)")
    else:
        device, name = "cuda", gpus[0]["name"]
        capability, memory = tuple(gpus[0]["capability"]), float(gpus[0]["memory_gib"])
        if capability >= (8, 0):
            auto_dtype = "bfloat16"
            reasons.append(f"{name} is sm{capability[0]}{capability[1]} (>= sm80): bf16, same range as fp32, no loss scaling")
        else:
            auto_dtype = "float16"
            reasons.append(f"{name} is sm{capability[0]}{capability[1]} (< sm80): no bf16, so fp16 with a gradient scaler")
    if dtype == "auto":
        dtype = auto_dtype
    else:
        reasons.append(f"dtype={dtype} forced by config")
    if dtype == "bfloat16" and device == "cuda" and capability < (8, 0):
        raise ConfigError(f"config: dtype=bfloat16 but {name} (sm{capability[0]}{capability[1]}) has no bf16 support")

    if attn_implementation == "auto":
        if device == "cuda" and capability >= (8, 0) and flash_attn_installed and dtype != "float32":
            attn_implementation = "flash_attention_2"
            reasons.append("flash_attn is installed and the GPU is sm80+: flash_attention_2")
        else:
            why = ("the GPU is below sm80" if device == "cuda" and capability < (8, 0)
                   else "flash_attn is not installed" if device == "cuda" else "on the CPU")
            attn_implementation = "sdpa"
            reasons.append(f"sdpa attention: {why}")
    else:
        reasons.append(f"attn_implementation={attn_implementation} forced by config")
    capped = device == "cuda" and 0 < memory_cap_gib < memory
    if capped:
        reasons.append(f"gpu_memory_gib={memory_cap_gib:g}: this process uses at most {memory_cap_gib:g} of the card's "
                       f"{memory:.1f} GiB per GPU")
        memory = memory_cap_gib
    return Hardware(device=device, gpu_name=name, gpu_count=len(gpus), gpu_memory_gib=round(memory, 1),
                    compute_capability=capability, dtype=dtype, attn_implementation=attn_implementation,
                    use_grad_scaler=(dtype == "float16"), reasons=reasons, memory_capped=capped)


def apply_memory_cap(hardware):
    """Hold this process to hardware.gpu_memory_gib on every visible GPU (a no-op without a cap). Called in
    each process that uses a GPU: the main one and every fold worker."""
    if not hardware.memory_capped:
        return
    for index in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(index).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, hardware.gpu_memory_gib / total), index)


def detect_hardware(cfg, gpus=None, verbose=True):
    """Look at the machine (or a faked GPU list) and print what was chosen and why."""
    hardware = choose_hardware(describe_gpus() if gpus is None else gpus, cfg.dtype, cfg.attn_implementation,
                               memory_cap_gib=cfg.gpu_memory_gib)
    if verbose:
        print(f"[hardware] {hardware.gpu_count} x {hardware.gpu_name} ({hardware.gpu_memory_gib} GiB), "
              f"compute dtype {hardware.dtype}, attention {hardware.attn_implementation}")
        for reason in hardware.reasons:
            print(f"[hardware]   because {reason}")
    return hardware


def compute_autocast(hardware):
    """The forward's mixed precision: autocast to the hardware's dtype on a GPU, nothing on the CPU / in fp32."""
    if hardware.device == "cuda" and hardware.dtype != "float32":
        return torch.autocast("cuda", dtype=hardware.torch_dtype)
    return contextlib.nullcontext()
