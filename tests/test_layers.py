"""layers.conv2d: the CPU path (the GEMM forward of small maps; canonical-conv or one-GEMM
kernel gradients; GEMM, flipped-maps, flipped-kernel and sub-pixel input gradients) equals
XLA's own lax.conv_general_dilated and its gradients, outside and inside a lax.scan and on a
mesh, and flax's nn.Conv accepts it; layers.attention's hand-written backward equals torch's
autograd."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fasdiff_jax.models import layers


def _lax(x, w, strides, padding):
    return jax.lax.conv_general_dilated(x, w, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# (input shape, kernel size, out channels, strides, padding): odd sizes, asymmetric and
# string padding, strides 1/2/3, kernels 1..5.
CASES = [
    ((2, 13, 11, 5), 5, 7, (2, 2), ((2, 2), (2, 2))),
    ((2, 12, 10, 5), 3, 7, (2, 2), ((0, 1), (0, 1))),  # diffusers' VAE downsample
    ((2, 12, 9, 5), 3, 7, (2, 2), ((1, 1), (1, 1))),
    ((1, 10, 11, 3), 4, 2, (3, 2), ((1, 2), (0, 1))),
    ((1, 9, 9, 2), 2, 3, (2, 2), ((0, 0), (0, 0))),
    ((2, 8, 7, 4), 3, 6, (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 7, 4), 1, 6, (1, 1), ((0, 0), (0, 0))),
    ((1, 11, 8, 3), 3, 4, (2, 1), "SAME"),
    ((2, 9, 8, 3), 1, 4, (1, 1), ((1, 2), (2, 0))),  # padding wider than the kernel
    ((1, 10, 9, 3), 3, 4, (1, 1), ((-1, 0), (0, -1))),  # negative padding
    ((1, 10, 9, 3), 3, 4, (2, 2), ((-1, 1), (1, -1))),
]


@pytest.mark.parametrize("shape,k,out,strides,padding", CASES)
def test_conv2d_value_and_gradients_match_lax(shape, k, out, strides, padding):
    rng = np.random.default_rng(sum(shape) + k)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, shape[-1], out)), jnp.float32)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding)))

    np.testing.assert_allclose(np.asarray(layers.conv2d(x, w, strides, padding)),
                               np.asarray(_lax(x, w, strides, padding)), rtol=1e-6, atol=1e-5)
    ours = jax.jit(jax.grad(loss(layers.conv2d), (0, 1)))(x, w)
    ref = jax.jit(jax.grad(loss(_lax), (0, 1)))(x, w)
    for name, a, b in zip(("dx", "dw"), ours, ref):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.abs(b).max()),
                                   err_msg=name)


@pytest.mark.parametrize("shape,k,out,strides,padding",
                         [c for c in CASES if isinstance(c[4], tuple) and min(c[4][0][0], c[4][1][0]) >= 0])
def test_the_one_gemm_kernel_gradient_matches_lax(shape, k, out, strides, padding):
    """The kernel gradient large layers take (:func:`layers._kernel_grad_gemm`) on every
    shape above, not only those past its size threshold."""
    rng = np.random.default_rng(sum(shape) + k + 1)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, shape[-1], out)), jnp.float32)
    y, vjp = jax.vjp(lambda w: _lax(x, w, strides, padding), w)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    got = layers._kernel_grad_gemm(x, dy, w.shape, strides, padding)
    want = vjp(dy)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                               atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("shape,k,out,strides,padding",
                         [c for c in CASES if c[3] == (1, 1)])
@pytest.mark.parametrize("form", ["_input_grad_gemm", "_input_grad_flipped_maps",
                                  "_input_grad_flipped_kernel"])
def test_every_stride1_input_gradient_matches_lax(form, shape, k, out, strides, padding):
    """The three input-gradient forms of stride-1 convs (the rules pick one per layer) on
    every stride-1 shape above, wide and negative pads included."""
    rng = np.random.default_rng(sum(shape) + k + 2)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, shape[-1], out)), jnp.float32)
    y, vjp = jax.vjp(lambda x: _lax(x, w, strides, padding), x)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    got = getattr(layers, form)(dy, w, padding)
    want = vjp(dy)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                               atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("side,form", [(8, "gemm"), (23, "maps"), (64, "kernel")])
def test_conv2d_picks_the_input_gradient_form_by_map_size(side, form):
    """A 3x3 512->256 conv: on an 8x8 map (64 positions) the input gradient is one GEMM (the
    program has no conv left: its forward is a GEMM too); past 512 positions it is a conv, on
    23x23 (kernel 1.2M elements vs maps 0.4M) of the flipped dy, on 64x64 with the flipped
    kernel. Each equals lax's."""
    rng = np.random.default_rng(9)
    w = jnp.asarray(rng.standard_normal((3, 3, 512, 256)) * 0.05, jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, side, side, 512)), jnp.float32)
    pads = ((1, 1), (1, 1))

    def dx(conv):
        return jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(conv(x, w, (1, 1), pads)))))

    want = dx(_lax)(x)
    np.testing.assert_allclose(np.asarray(dx(layers.conv2d)(x)), np.asarray(want),
                               atol=1e-5 * float(jnp.abs(want).max()))
    lowered = dx(layers.conv2d).lower(x)
    kernel_reversed = re.search(r"stablehlo.reverse [^\n]*tensor<3x3x512x256xf32>",
                                lowered.as_text()) is not None
    convs = len(re.findall(r"dim_labels=", lowered.compile().as_text()))
    assert (convs, kernel_reversed) == {"gemm": (0, False), "maps": (2, False),
                                        "kernel": (2, True)}[form]


@pytest.mark.parametrize("shape,k,out,strides,padding", CASES)
def test_the_gemm_forward_matches_lax(shape, k, out, strides, padding):
    """The conv small maps take on CPU (:func:`layers._conv_gemm`), on every shape above."""
    rng = np.random.default_rng(sum(shape) + k + 3)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, shape[-1], out)), jnp.float32)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(shape[1:3], (k, k), strides, padding)
    want = _lax(x, w, strides, padding)
    got = layers._conv_gemm(x, w, strides, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(want).max()))


def test_conv2d_takes_the_gemm_forms_on_small_maps_with_many_channels():
    """512 output positions with 256 channels in and out: the conv and its input gradient run
    as GEMMs (the kernel gradient's conv is the program's only one); 544 positions or 128
    input channels: all three are convs. All equal lax's."""
    rng = np.random.default_rng(11)
    pads = ((1, 1), (1, 1))
    for rows, c_in, convs in ((16, 256, 1), (17, 256, 3), (16, 128, 3)):  # 2 x rows x 16 outputs
        w = jnp.asarray(rng.standard_normal((3, 3, c_in, 256)) * 0.05, jnp.float32)
        x = jnp.asarray(rng.standard_normal((2, rows, 16, c_in)), jnp.float32)

        def grads(conv):
            loss = lambda x, w: jnp.sum(jnp.sin(conv(x, w, (1, 1), pads)))  # noqa: E731
            return jax.jit(jax.grad(loss, (0, 1)))

        for got, want in zip(grads(layers.conv2d)(x, w), grads(_lax)(x, w)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                       atol=1e-5 * float(jnp.abs(want).max()))
        hlo = grads(layers.conv2d).lower(x, w).compile().as_text()
        assert len(re.findall(r"dim_labels=", hlo)) == convs, (rows, c_in)


def test_the_gemm_forms_on_a_mesh_equal_one_device():
    """The input gradient's GEMM reshapes the kernel; with its channels split over fsdp and
    tensor and the batch over data (2x2x2), the value and both gradients equal one device's."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 256, 512)) * 0.05, jnp.float32)
    pads = ((1, 1), (1, 1))
    assert layers._gemm_conv_pays(2 * 8 * 8, w.shape)

    def value_and_grads(x, w):
        return jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(layers.conv2d(x, w, (1, 1), pads))),
                                  (0, 1))(x, w)

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    shardings = (NamedSharding(mesh, P("data")),
                 NamedSharding(mesh, P(None, None, "fsdp", "tensor")))
    on_mesh = jax.jit(value_and_grads, in_shardings=shardings)(
        *(jax.device_put(a, sh) for a, sh in zip((x, w), shardings)))
    single = jax.jit(value_and_grads)(x, w)
    for got, want in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(want).max()))


def test_conv2d_takes_the_one_gemm_kernel_gradient_past_its_threshold():
    """A 33x34 map with 128 channels (>= 1024 outputs, >= 128 GEMM rows): conv2d's kernel
    gradient is the one-GEMM form (a dot: the program's one conv is the forward) and equals
    lax's."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((1, 33, 34, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 128, 8)) * 0.1, jnp.float32)
    pads = ((1, 1), (1, 1))

    def dw(conv):
        return jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(conv(x, w, (1, 1), pads)))))

    np.testing.assert_allclose(np.asarray(dw(layers.conv2d)(w)), np.asarray(dw(_lax)(w)),
                               atol=1e-5 * float(jnp.abs(dw(_lax)(w)).max()))
    hlo = dw(layers.conv2d).lower(w).compile().as_text()
    assert len(re.findall(r"dim_labels=", hlo)) == 1, "the forward's conv only"


def test_conv2d_gradients_inside_a_scan_match_lax():
    """Gradient accumulation traces the gradients inside a lax.scan, where XLA:CPU keeps its own
    conv gradients non-canonical (slow); ours must still be the same numbers there."""
    rng = np.random.default_rng(5)
    xs = jnp.asarray(rng.standard_normal((3, 2, 12, 10, 4)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((5, 5, 4, 6)), jnp.float32),
          jnp.asarray(rng.standard_normal((3, 3, 6, 5)), jnp.float32)]

    def net(conv):
        def loss(ws, x):
            h = jnp.tanh(conv(x, ws[0], (2, 2), ((2, 2), (2, 2))))
            return jnp.sum(jnp.sin(conv(h, ws[1], (1, 1), ((1, 1), (1, 1)))))

        def accumulated(ws):
            def body(total, x):
                return jax.tree.map(jnp.add, total, jax.grad(loss)(ws, x)), None
            return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, ws), xs)[0]
        return jax.jit(accumulated)

    ours, ref = net(layers.conv2d)(ws), net(_lax)(ws)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.abs(b).max()))
    # every conv of the compiled loop in the form XLA:CPU gives its fast kernels
    labels = re.findall(r"dim_labels=([^,\s]+)", net(layers.conv2d).lower(ws).compile().as_text())
    assert len(labels) == 5 and set(labels) == {"b01f_01io->b01f"}, labels


def test_flax_conv_uses_it_and_other_convs_fall_back():
    conv = layers.Conv(4, 3, 2, name="c")
    x = jnp.ones((1, 8, 8, 3))
    params = conv.init(jax.random.key(0), x)
    ref = nn.Conv(4, (3, 3), (2, 2), padding=((1, 1), (1, 1))).apply(
        {"params": jax.tree.map(nn.unbox, params["params"])}, x)
    np.testing.assert_allclose(np.asarray(conv.apply(params, x)), np.asarray(ref), rtol=1e-6)
    # grouped and dilated convs are passed through to lax unchanged
    w = jnp.ones((3, 3, 1, 4))
    got = layers.conv2d(jnp.ones((1, 8, 8, 4)), w, (1, 1), ((1, 1), (1, 1)),
                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
    want = jax.lax.conv_general_dilated(jnp.ones((1, 8, 8, 4)), w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=4)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("causal,lk", [(False, 37), (False, 64), (True, 64)])
def test_attention_value_and_gradients_match_torch(causal, lk):
    """Our attention (hand-written backward) against torch's scaled_dot_product_attention."""
    import torch

    rng = np.random.default_rng(3)
    b, lq, heads, d = 2, 64, 3, 16
    q, k, v = (rng.normal(size=s).astype(np.float32)
               for s in ((b, lq, heads * d), (b, lk, heads * d), (b, lk, heads * d)))
    w = rng.normal(size=(b, lq, heads * d)).astype(np.float32)

    def loss(q, k, v):
        return jnp.sum(layers.attention(q, k, v, heads, causal=causal) * w)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    split = lambda t: t.reshape(b, t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(split(tq), split(tk), split(tv),
                                                           is_causal=causal)
    t_loss = (out.transpose(1, 2).reshape(b, lq, heads * d) * torch.tensor(w)).sum()
    t_loss.backward()
    assert abs(float(value) - t_loss.item()) <= 1e-5 * abs(t_loss.item()) + 1e-4
    for ours, ref in zip(grads, (tq.grad, tk.grad, tv.grad)):
        ref = ref.numpy()
        assert np.abs(np.asarray(ours) - ref).max() <= 2e-6 * np.abs(ref).max() + 1e-6


@pytest.mark.parametrize("upcast", [False, True])
def test_attention_bfloat16_gradients_follow_float32(upcast):
    """In bfloat16 the hand-written backward stays within bfloat16's error of float32's
    autodiff, and each gradient has its input's dtype."""
    rng = np.random.default_rng(4)
    q, k, v, w = (jnp.asarray(rng.normal(size=(2, 48, 32)), jnp.float32) for _ in range(4))

    def loss(attention, q, k, v):
        return jnp.sum(attention(q, k, v).astype(jnp.float32) * w)

    def autodiff_reference(q, k, v):
        return layers.attention(q, k, v, 2, impl="xla_autodiff")

    ref = jax.grad(functools.partial(loss, autodiff_reference), argnums=(0, 1, 2))(q, k, v)
    ours = jax.jit(jax.grad(functools.partial(
        loss, lambda q, k, v: layers.attention(q, k, v, 2, upcast=upcast)), argnums=(0, 1, 2)))(
        *(t.astype(jnp.bfloat16) for t in (q, k, v)))
    for o, r in zip(ours, ref):
        assert o.dtype == jnp.bfloat16
        err = np.abs(np.asarray(o.astype(jnp.float32)) - np.asarray(r)).max()
        assert err <= 3e-2 * np.abs(np.asarray(r)).max()
