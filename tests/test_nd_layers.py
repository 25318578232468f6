"""BatchNorm on (C, L) and (C, H, W) samples, and LayerNorm, Dropout, Activation and Residual
on them: against PyTorch (float64), against finite differences, dropout's masks in the
storage order, and the shapes they refuse."""
import numpy as np
import pytest

import backprop as bp
from cnn_oracle import Case, case_tests, dropout, torch_activation, torch_modules

torch = pytest.importorskip("torch")
nn = torch.nn
pytestmark = pytest.mark.usefixtures("torch_on_one_thread")
F64 = dict(dtype=torch.float64)
Sum = torch_modules()[0]


def case(shape, layers, modules):
    """layers() the backprop layers, modules(net, layers) their torch twins."""
    return Case(layers, modules, shape)


def batchnorm(shape, **options):
    cls = (nn.BatchNorm1d, nn.BatchNorm2d)[len(shape) - 2]
    return case(shape, lambda: [bp.BatchNorm(shape[0], **options)],
                lambda net, layers: [cls(shape[0], **options, **F64)])


def layernorm(shape, **options):
    return case(shape, lambda: [bp.LayerNorm(shape[-1], **options)],
                lambda net, layers: [nn.LayerNorm(shape[-1], **options, **F64)])


def activation(shape, name):
    return case(shape, lambda: [bp.Activation(name)],
                lambda net, layers: [torch_activation(name) or nn.Identity()])


CASES = {
    "batchnorm-chw": batchnorm((3, 7, 5)),
    "batchnorm-cl": batchnorm((3, 9)),
    "batchnorm-options": batchnorm((4, 5, 3), eps=1e-3, momentum=0.3, affine=False),
    "batchnorm-1-pixel": batchnorm((2, 1, 1)),
    "batchnorm-length-1": batchnorm((3, 1)),
    "layernorm-chw": layernorm((3, 7, 5)),
    "layernorm-cl": layernorm((3, 9)),
    "layernorm-options": layernorm((2, 3, 4), eps=1e-3, elementwise_affine=False),
    "dropout-chw": case((3, 7, 5), lambda: [bp.Dropout(0.3)],
                        lambda net, layers: [dropout(net, layers[0])]),
    "dropout-cl": case((3, 9), lambda: [bp.Dropout(0.5)],
                       lambda net, layers: [dropout(net, layers[0])]),
    **{f"activation-{name}-chw": activation((2, 5, 4), name)
       for name in ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu",
                    "softplus")},
    "activation-gelu-cl": activation((3, 7), "gelu"),
    "activation-softplus-cl": activation((3, 7), "softplus"),
    # (no bias before BatchNorm: its gradient is zero up to rounding, which Adam's
    # normalised steps would blow up to differences of lr)
    "residual-conv-bn-relu": case(
        (3, 6, 5),
        lambda: [bp.Residual(bp.Conv2d(3, 3, 3, padding=1, bias=False), bp.BatchNorm(3),
                             bp.Activation("relu"))],
        lambda net, layers: [Sum(nn.Conv2d(3, 3, 3, padding=1, bias=False, **F64),
                                 nn.BatchNorm2d(3, **F64), nn.ReLU())]),
    "residual-layernorm": case(             # f(x) stored channels first, x perhaps not
        (3, 4, 5), lambda: [bp.Residual(bp.LayerNorm(5))],
        lambda net, layers: [Sum(nn.LayerNorm(5, **F64))]),
    "residual-maxpool": case(
        (2, 5, 5), lambda: [bp.Residual(bp.MaxPool2d(3, stride=1, padding=1))],
        lambda net, layers: [Sum(nn.MaxPool2d(3, stride=1, padding=1))]),
    "residual-avgpool-cl": case(
        (3, 7), lambda: [bp.Residual(bp.AvgPool1d(3, stride=1, padding=1,
                                                  count_include_pad=False))],
        lambda net, layers: [Sum(nn.AvgPool1d(3, stride=1, padding=1,
                                              count_include_pad=False))]),
    "residual-nested-dropout": case(
        (3, 8),
        lambda: [bp.Residual(bp.Dropout(0.2), bp.Residual(bp.Activation("tanh"),
                                                          bp.Conv1d(3, 3, 3, padding=1)))],
        lambda net, layers: [Sum(dropout(net, layers[0].layers[0]),
                                 Sum(nn.Tanh(), nn.Conv1d(3, 3, 3, padding=1, **F64)))]),
}

FD_EVERYWHERE = ["batchnorm-chw", "batchnorm-cl", "layernorm-chw", "dropout-chw",
                 "activation-gelu-chw", "residual-conv-bn-relu", "residual-nested-dropout"]

(test_matches_torch, test_adam_steps_match_torch, test_finite_differences_as_the_output_layer,
 test_finite_differences) = case_tests(CASES, FD_EVERYWHERE)


def test_dropout_on_images_keeps_a_fraction_and_follows_the_storage_order(rng):
    """The same Dropout after a convolution (channels last) and on the input (channels
    first) draws its mask over the values as stored: the masks, mapped back to (C, H, W),
    differ; each keeps close to 1 - p of the values."""
    p = 0.4
    first = bp.Network([bp.Dropout(p)], dtype="float64", seed=5, input_shape=(4, 30, 20))
    last = bp.Network([bp.Conv2d(4, 4, 1, bias=False), bp.Dropout(p)], dtype="float64",
                      seed=5, input_shape=(4, 30, 20))
    last.layers[0].weight[...] = np.eye(4).reshape(4, 4, 1, 1)
    x = rng.uniform(1, 2, size=(50, 4, 30, 20))          # no zeros: the mask shows
    kept_first, kept_last = first.forward(x) != 0, last.forward(x) != 0
    # 120,000 draws each: the kept fraction's standard deviation is sqrt(p (1 - p) / 1.2e5)
    # = 0.0014; 5 of them is a generous bound.
    for kept in (kept_first, kept_last):
        assert abs(kept.mean() - (1 - p)) < 5 * 0.0014
    assert (kept_first != kept_last).mean() > 0.3     # about 2 p (1 - p) = 0.48 differ


@pytest.mark.parametrize("layers, shape, message", [
    (lambda: [bp.Activation("softmax")], (3, 4),
     r"layers\[0\] \(Activation\('softmax'\)\): softmax is over the features of a "
     r"\(features,\) sample, but this one is \(3, 4\); Flatten first"),
    (lambda: [bp.BatchNorm(3)], (4, 5, 5),
     r"takes samples of shape \(3,\), \(3, L\) or \(3, H, W\), but its input is \(4, 5, 5\)"),
    (lambda: [bp.LayerNorm(5)], (3, 5, 4),
     r"normalises a last dimension of 5, but its input is \(3, 5, 4\)"),
    (lambda: [bp.Residual(bp.Conv2d(3, 3, 3))], (3, 6, 6),
     r"layers\[0\] \(Residual.*f must keep the shape .* maps \(3, 6, 6\) to \(3, 4, 4\)"),
    (lambda: [bp.Residual(bp.MaxPool1d(2))], (3, 6),
     r"f must keep the shape .* maps \(3, 6\) to \(3, 3\)"),
])
def test_shapes_that_do_not_fit_are_refused_naming_the_layer(layers, shape, message):
    with pytest.raises(ValueError, match=message):
        bp.Network(layers(), input_shape=shape)


def test_batchnorm_on_images_takes_one_sample_in_train_mode_unless_it_is_one_pixel(rng):
    """Train-mode BatchNorm needs more than one value per channel: one (C, H, W) image
    holds H * W of them (torch takes it too); a (C, 1, 1) sample holds one."""
    net = bp.Network([bp.BatchNorm(3)], loss="mse", dtype="float64", input_shape=(3, 4, 2))
    module = nn.BatchNorm2d(3, **F64)
    x = rng.normal(size=(1, 3, 4, 2))
    np.testing.assert_allclose(net.forward(x), module(torch.tensor(x)).detach().numpy(),
                               rtol=1e-9, atol=1e-12)
    one = bp.Network([bp.BatchNorm(3)], dtype="float64", input_shape=(3, 1, 1))
    with pytest.raises(ValueError, match="more than one value per channel"):
        one.forward(rng.normal(size=(1, 3, 1, 1)))
    assert one.eval().forward(np.ones((1, 3, 1, 1))).shape == (1, 3, 1, 1)
