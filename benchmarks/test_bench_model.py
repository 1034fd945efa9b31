"""DANet-R50 end to end: one training step and inference, fused attention vs "reference" (the
released bmm modules), the number users care about most: img/s and peak memory.

Model: models.danet.DANet(19, "resnet50") (dilated ResNet-50 at output stride 8, the released
DANetHead; attention at 1/8 of the image: N = 8192 at 512x1024, 32768 at 1024x2048). Training
step: forward in train mode, the released loss (cross-entropy summed over the three outputs),
backward, SGD step. Inference: eval mode under torch.no_grad(). GPU: bf16 autocast, batch 2, both
sizes in the full sweep (512x1024 in the short one); an out-of-memory case gives an "OOM" row.
CPU (2 cores are slow): full sweep only, batch 1, 512x1024: inference in fp32 and under
torch.autocast("cpu", bfloat16) (two timed calls each), and one timed fp32 training step (after
the two warm-up calls every case makes). Each row names the CPU's matrix ISA. On a CPU without
bf16 units (benchmarks/machine.py) the bf16 autocast rows are skipped, saying so: the backbone's
convolutions would run in emulated bf16 for hours, whichever attention runs.
"""
import pytest
import torch
import torch.nn.functional as F

from models.danet import DANet

from .checks import fused_backends
from .conftest import FULL, devices, measure, sync
from .machine import has_hardware

NCLASS = 19


def _cases():
    for dev in devices():
        if dev == "cpu":
            sizes, B = ([(512, 1024)] if FULL else []), 1
        else:
            sizes, B = ([(512, 1024), (1024, 2048)] if FULL else [(512, 1024)]), 2
        # (mode, dtype): CPU infers in fp32 and under bf16 autocast and trains in fp32; the GPU
        # does both under bf16 autocast.
        runs = ([("infer", torch.float32), ("infer", torch.bfloat16), ("train", torch.float32)]
                if dev == "cpu" else [("infer", torch.bfloat16), ("train", torch.bfloat16)])
        for H, W in sizes:
            for mode, dtype in runs:
                backends = ["reference"] + [b for b in fused_backends("pam", dev, dtype)
                                            if b in fused_backends("cam", dev, dtype)]
                for backend in backends:
                    yield pytest.param(dev, dtype, B, H, W, mode, backend,
                                       id=f"{dev}-{mode}-{str(dtype).split('.')[-1]}-B{B}-{H}x{W}-{backend}")


@pytest.mark.parametrize("dev,dtype,B,H,W,mode,backend", list(_cases()))
def test_danet_r50(benchmark, record, dev, dtype, B, H, W, mode, backend):
    benchmark.group = f"model-{mode}-{dev}-{str(dtype).split('.')[-1]}-{H}x{W}"
    info = dict(op=f"model-{mode}", backend=backend, device=dev, dtype=str(dtype).split(".")[-1],
                B=B, C=512, Cq=64, H=H, W=W, N=(H // 8) * (W // 8), flops=None,
                input_bytes=B * 3 * H * W * 4, **{"pass": "fwdbwd" if mode == "train" else "fwd"})
    if not has_hardware(dtype, dev):
        why = f"skipped: {str(dtype)[6:]} autocast on a CPU without {str(dtype)[6:]} units runs emulated"
        record(benchmark, status="skipped", note=why, peak_mem=None, **info)
        pytest.skip(why)
    if dev == "cuda":
        torch.cuda.empty_cache()  # the previous case's model is gone: start from a clean cache
    torch.manual_seed(0)
    model = DANet(NCLASS, "resnet50", attention_backend=backend).to(dev)
    x = torch.randn(B, 3, H, W, device=dev)
    target = torch.randint(0, NCLASS, (B, H, W), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    amp = torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32)

    def infer():
        with torch.no_grad(), amp:
            model(x)
        sync(dev)

    def train():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = sum(F.cross_entropy(o.float(), target) for o in model(x))
        loss.backward()
        opt.step()
        sync(dev)

    model.train(mode == "train")
    rounds = (1 if mode == "train" else 2) if dev == "cpu" else 5  # CPU: one timed training step
    status, mem, note = measure(benchmark, train if mode == "train" else infer, dev, rounds)
    record(benchmark, status=status, note=note, peak_mem=mem, **info)
