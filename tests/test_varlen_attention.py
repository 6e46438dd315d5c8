"""Packed images of different lengths attend through torch's variable-length attention on CUDA (no padding to
the longest image), one image at a time on a CPU, and through the padded, masked path with VIT.VARLEN_ATTENTION
False (or on a GPU without the kernel). The kernel needs a GPU;
on the CPU the tests put an exact emulation of its contract (q, k, v [T, heads, dh], cumulative starts, the
longest length) in its place, so that the packing around it, the dispatch and the fallbacks are checked
everywhere, and the real kernel where a GPU is present."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vitadapt.config import load_config  # noqa: E402
from vitadapt.models import build_model  # noqa: E402
from vitadapt.models import vit as vit_module  # noqa: E402
from vitadapt.models.synthetic import add_halting_drift_, sharpen_  # noqa: E402

SMALL = ["NUM_GPUS", "0", "VIT.EMBED_DIM", "96", "VIT.NUM_HEADS", "3", "DATA.TRAIN_CROP_SIZE", "112",
         "DATA.TEST_CROP_SIZE", "112", "MODEL.NUM_CLASSES", "10"]


class EmulatedVarlen:
    """varlen_attn's contract on any device: each sequence attends over its own rows; records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
        assert q.dim() == 3 and q.shape == k.shape == v.shape and cu_seq_q.dtype == torch.int32
        starts = cu_seq_q.tolist()
        assert torch.equal(cu_seq_q, cu_seq_k) and starts[0] == 0 and starts[-1] == q.shape[0]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        assert max_q == max_k == max(lengths) and min(lengths) < max(lengths)  # only unequal lengths come here
        self.calls.append(lengths)
        out = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=scale).transpose(0, 1)
               for a, b in zip(starts, starts[1:])]
        return torch.cat(out)


def _model(path: str, varlen: bool, *opts: str):
    torch.manual_seed(0)
    model = build_model(load_config(path, SMALL + ["VIT.VARLEN_ATTENTION", str(varlen), *opts]))
    sharpen_(model)
    return model


def _avit(varlen: bool):
    """A-ViT whose tokens halt, differently per image: packed images of unequal lengths."""
    model = _model("configs/ImageNet/AViT/AViT_DeiT_S.yaml", varlen)
    add_halting_drift_(model)
    return model


def _ats(varlen: bool):
    """ATS in blocks 3 and 4 only: the plain blocks after them see packed images of unequal lengths."""
    return _model("configs/ImageNet/ATS_DeiT_S.yaml", varlen, "ATS.BLOCKS", "[3, 4]")


@pytest.fixture
def emulated(monkeypatch):
    kernel = EmulatedVarlen()
    monkeypatch.setattr(vit_module, "varlen_attn", kernel)
    monkeypatch.setattr(vit_module, "varlen_supported", lambda x: True)
    return kernel


def test_varlen_equals_padded_inference(emulated):
    images = torch.randn(6, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for varlen in (False, True):
        model = _avit(varlen).eval()
        before = len(emulated.calls)
        with torch.no_grad():
            outputs[varlen] = model(images)
        assert (len(emulated.calls) > before) == varlen  # VIT.VARLEN_ATTENTION False never takes the kernel
        counts = model.last_token_counts[:, :, 0]
    assert any(len(set(c)) > 1 for c in counts.t().tolist()), "no block saw unequal lengths"
    assert (outputs[True] - outputs[False]).abs().max() <= 1e-5


def test_varlen_equals_padded_training_gradients(emulated):
    """Training steps take the same path (the kernel has a backward): the same loss and gradients."""
    images = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    grads = {}
    for varlen in (False, True):
        model = _ats(varlen).train()
        model(images).logsumexp(dim=1).sum().backward()
        grads[varlen] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(emulated.calls) == 12 - 5 and grads[True].keys() == grads[False].keys()
    for name, grad in grads[True].items():
        assert (grad - grads[False][name]).abs().max() <= 1e-5 * max(1.0, grads[False][name].abs().max()), name


def test_methods_that_read_the_padded_attention_keep_the_padded_path(emulated):
    """ATS reads the CLS attention row and the values in the padded layout, A-ViT's training taps the keys and
    values: those blocks never take the kernel."""
    model = _ats(True).eval()
    with torch.no_grad():
        model(torch.randn(4, 3, 112, 112))
    lengths = model.last_token_counts[:, 5:, 0]
    assert len(set(lengths[:, 0].tolist())) > 1  # unequal lengths after the ATS blocks
    assert len(emulated.calls) == 12 - 5  # the plain blocks after block 4 (block 4 itself needs the CLS row)
    avit = _avit(True).train()
    avit(torch.randn(4, 3, 112, 112))
    assert len(emulated.calls) == 12 - 5 and len(set(avit.last_token_counts[:, -1, 0].tolist())) > 1


def test_cpu_float32_has_no_kernel():
    assert not vit_module.varlen_supported(torch.zeros(3, 8))


@pytest.mark.parametrize("train", [False, True])
def test_cpu_attends_image_by_image_without_the_kernel(monkeypatch, train):
    """Without the kernel (a CPU), packed images of unequal lengths attend one image at a time, unpadded, ATS's
    second block too (its CLS row and values come per image): the same tokens kept, the same logits and, in
    training, the same gradients as the padded path; explicit products for small inference."""
    calls = []
    attend_rows = vit_module.Attention.attend_rows
    monkeypatch.setattr(vit_module.Attention, "attend_rows", lambda self, qkv, **kw: calls.append(qkv.shape[0]) or
                        attend_rows(self, qkv, **kw))
    images = torch.randn(5, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    results = {}
    for varlen in (False, True):
        model = _ats(varlen).train(train)
        with torch.set_grad_enabled(train):
            logits = model(images)
        grads = {}
        if train:
            logits.logsumexp(dim=1).sum().backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[varlen] = (logits.detach(), grads, len(calls), model.last_num_kept)
    (padded, padded_grads, padded_calls, padded_kept), (unpadded, grads, unpadded_calls, kept) = results[False], results[True]
    assert padded_calls == 0 and unpadded_calls == 5 * (12 - 4)  # every image in every block after ATS's first
    assert torch.equal(kept, padded_kept) and len(set(kept[0].tolist())) > 1
    assert len(set(calls)) > 1  # images of different lengths
    assert (unpadded - padded).abs().max() <= 1e-5
    assert grads.keys() == padded_grads.keys() and len(grads) > 0 or not train
    for name, grad in grads.items():
        assert (grad - padded_grads[name]).abs().max() <= 1e-5 * max(1.0, padded_grads[name].abs().max()), name


@pytest.mark.skipif(not torch.cuda.is_available() or vit_module.varlen_attn is None,
                    reason="the varlen kernel runs on CUDA only")
def test_real_kernel_equals_padded_on_cuda():
    images = torch.randn(6, 3, 112, 112, generator=torch.Generator().manual_seed(1)).cuda()
    outputs = {}
    for varlen in (False, True):
        model = _avit(varlen).cuda().eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            outputs[varlen] = model(images).float()
    assert (outputs[True] - outputs[False]).abs().max() <= 0.05  # bf16 rounding on both paths
