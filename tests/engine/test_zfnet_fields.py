"""ZFNet's receptive fields and shapes (Fig. 3) against hand arithmetic."""

from __future__ import annotations

import warnings

import torch

from convlens.engine import trace_model


def _zfnet():
    from convlens.models import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model("zfnet")


def test_zfnet_fields_by_hand():
    rec = trace_model(_zfnet(), torch.zeros(1, 3, 224, 224))
    # conv1 7x7/2 pad 1: size 7, stride 2, first field starts at -1 (the padding)
    # pool1 3x3/2: 7 + 2*2 = 11, stride 4; conv2 5x5/2: 11 + 4*4 = 27, stride 8
    # pool2: 27 + 2*8 = 43, stride 16; conv3..5 3x3 pad 1: +32 each, start -16 each
    expected = {
        "conv1": ((7, 7), (2, 2), (-1, -1), (96, 110, 110)),
        "features.pool1": ((11, 11), (4, 4), (-1, -1), (96, 55, 55)),
        "conv2": ((27, 27), (8, 8), (-1, -1), (256, 26, 26)),
        "features.pool2": ((43, 43), (16, 16), (-1, -1), (256, 13, 13)),
        "conv3": ((75, 75), (16, 16), (-17, -17), (384, 13, 13)),
        "conv4": ((107, 107), (16, 16), (-33, -33), (384, 13, 13)),
        "conv5": ((139, 139), (16, 16), (-49, -49), (256, 13, 13)),
        "pool5": ((171, 171), (32, 32), (-49, -49), (256, 6, 6)),
    }
    for name, (size, stride, start, shape) in expected.items():
        call = rec.layer(name)
        assert (call.rf.size, call.rf.stride, call.rf.start) == (size, stride, start), name
        assert call.output_shape[1:] == shape, name
    assert rec.rf("fc7").is_global
    # the box of conv5 unit (6, 6) is centred on the image centre: -49 + 6*16 + 69 = 116
    x0, y0, x1, y1 = rec.rf("conv5").box(6, 6)
    assert (x0 + x1 - 1) / 2 == -49 + 6 * 16 + 69
