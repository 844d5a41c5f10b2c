"""The two networks of the method and their shared weights policy.

* :func:`build_lung_unet` -- VGG16-encoder U-Net for 2D lung segmentation (METHOD.md section 2).
* :func:`build_slice_classifier` -- ResNet-50 slice classifier (section 3); :data:`GRADCAM_LAYERS`
  names the layers the fine Grad-CAM uses (section 4).
* Both take the windowed [0, 1] three-channel image: the ImageNet preprocessing is a layer inside
  each model. Pretrained-weights sources and the offline fallback: :mod:`.weights`.
* :func:`load_model` loads a saved ``.keras`` model in safe mode; :func:`count_flops` counts FLOPs;
  :func:`with_compute_precision` runs a model at another precision (float32 / bfloat16),
  :func:`with_input_size` at another input size; :func:`fold_batchnorm` makes the inference copy
  analyze runs (BatchNormalization folded into the convolutions, :mod:`.inference`).
* :func:`build_contrastive_model` -- SimCLR pre-training of either backbone on unlabeled CT;
  :func:`export_backbone` writes the weights file the two networks load (:mod:`.contrastive`).
"""

from radlogics_repro.models.classifier import GRADCAM_LAYERS, build_slice_classifier
from radlogics_repro.models.contrastive import (
    NTXentLoss,
    build_contrastive_model,
    export_backbone,
    pair_accuracy,
)
from radlogics_repro.models.flops import count_flops
from radlogics_repro.models.inference import fold_batchnorm
from radlogics_repro.models.precision import (
    POLICIES,
    PRECISION_CHOICES,
    resolve_precision,
    with_compute_precision,
    with_input_size,
)
from radlogics_repro.models.unet import build_lung_unet
from radlogics_repro.models.weights import (
    CUSTOM_OBJECTS,
    ImageNetCaffePreprocess,
    ModelLoadError,
    PretrainedWeightsError,
    init_record,
    load_model,
    pretraining_card_path,
    pretraining_provenance,
)

__all__ = [
    "CUSTOM_OBJECTS",
    "GRADCAM_LAYERS",
    "POLICIES",
    "PRECISION_CHOICES",
    "ImageNetCaffePreprocess",
    "ModelLoadError",
    "NTXentLoss",
    "PretrainedWeightsError",
    "build_contrastive_model",
    "build_lung_unet",
    "build_slice_classifier",
    "count_flops",
    "export_backbone",
    "fold_batchnorm",
    "init_record",
    "load_model",
    "pair_accuracy",
    "pretraining_card_path",
    "pretraining_provenance",
    "resolve_precision",
    "with_compute_precision",
    "with_input_size",
]
