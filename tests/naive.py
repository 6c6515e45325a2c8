"""Straightforward numpy re-implementations of the ops' definitions (SPEC §2), written
as loops over output samples so they share nothing with mmfs_fast.ops."""
import numpy as np


def upfirdn2d(x, kernel, up, down, pad):
    """x (N, C, H, W), kernel (kh, kw), pad (x0, x1, y0, y1)."""
    x0, x1, y0, y1 = pad
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    # zero insertion: sample i lands at i*up
    upsampled = np.zeros((n, c, h * up, w * up))
    upsampled[:, :, ::up, ::up] = x
    H, W = h * up, w * up
    out_h = (H + y0 + y1 - kh) // down + 1
    out_w = (W + x0 + x1 - kw) // down + 1
    out = np.zeros((n, c, out_h, out_w))

    def sample(i, j):  # padded signal at (i, j) of the padded frame
        si, sj = i - y0, j - x0
        if 0 <= si < H and 0 <= sj < W:
            return upsampled[:, :, si, sj]
        return 0.0

    for oy in range(out_h):
        for ox in range(out_w):
            acc = np.zeros((n, c))
            for ky in range(kh):
                for kx in range(kw):
                    # true convolution: the kernel is flipped
                    acc += kernel[kh - 1 - ky, kw - 1 - kx] * sample(oy * down + ky, ox * down + kx)
            out[:, :, oy, ox] = acc
    return out


def bias_act(x, bias, act, alpha, gain, clamp, dim):
    if bias is not None:
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + bias.reshape(shape)
    if act == "relu":
        x = np.where(x > 0, x, 0.0)
    elif act == "lrelu":
        x = np.where(x > 0, x, alpha * x)
    x = x * gain
    if clamp is not None:
        x = np.clip(x, -clamp, clamp)
    return x


def styled_epilogue(x, demod, bias, noise, strength, alpha, next_styles=None, blur=None, blur_pad=0):
    """x (N, C, H, W), demod (N, C), bias (C,), noise None or (N or 1, 1, H', W'), next_styles None
    or (N, C), blur None or (kh, kw) with zero padding blur_pad (H' = H + 2·blur_pad - kh + 1);
    per output element."""
    n, c, h, w = x.shape
    kernel = np.ones((1, 1)) if blur is None else blur
    kh, kw = kernel.shape
    out_h, out_w = h + 2 * blur_pad - kh + 1, w + 2 * blur_pad - kw + 1
    out = np.empty((n, c, out_h, out_w))
    for b in range(n):
        for ch in range(c):
            for i in range(out_h):
                for j in range(out_w):
                    blurred = 0.0
                    for ky in range(kh):
                        for kx in range(kw):
                            si, sj = i + ky - blur_pad, j + kx - blur_pad
                            if 0 <= si < h and 0 <= sj < w:  # true convolution: the kernel is flipped
                                blurred += kernel[kh - 1 - ky, kw - 1 - kx] * x[b, ch, si, sj]
                    z = blurred * demod[b, ch] + bias[ch]
                    if noise is not None:
                        z += noise[b if noise.shape[0] > 1 else 0, 0, i, j] * strength
                    z = z if z > 0 else alpha * z
                    out[b, ch, i, j] = z if next_styles is None else z * next_styles[b, ch]
    return out


def conv2d(x, w, stride, padding):
    """x (C, H, W), w (O, C, k, k) cross-correlation."""
    c, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = np.zeros((c, h + 2 * padding, wd + 2 * padding))
    xp[:, padding:padding + h, padding:padding + wd] = x
    out_h = (h + 2 * padding - k) // stride + 1
    out_w = (wd + 2 * padding - k) // stride + 1
    out = np.zeros((o, out_h, out_w))
    for oy in range(out_h):
        for ox in range(out_w):
            patch = xp[:, oy * stride: oy * stride + k, ox * stride: ox * stride + k]
            out[:, oy, ox] = np.tensordot(w, patch, axes=([1, 2, 3], [0, 1, 2]))
    return out


def conv_transpose2d_stride2(x, w):
    """x (C, H, W), w (O, C, k, k): each input sample scatters its weighted kernel."""
    c, h, wd = x.shape
    o, _, k, _ = w.shape
    out = np.zeros((o, 2 * (h - 1) + k, 2 * (wd - 1) + k))
    for iy in range(h):
        for ix in range(wd):
            out[:, 2 * iy: 2 * iy + k, 2 * ix: 2 * ix + k] += np.einsum("ocij,c->oij", w, x[:, iy, ix])
    return out


def modulated_conv2d(x, weight, styles, demodulate, up, down, fir):
    b = x.shape[0]
    k = weight.shape[-1]
    outs = []
    for s in range(b):
        w = weight * styles[s][None, :, None, None]
        if demodulate:
            w = w / np.sqrt((w ** 2).sum(axis=(1, 2, 3), keepdims=True) + 1e-8)
        if up == 2:
            y = conv_transpose2d_stride2(x[s], w)
            p = (fir.shape[0] - 2) - (k - 1)
            pad = ((p + 1) // 2 + 1, p // 2 + 1)
            y = upfirdn2d(y[None], fir * 4, 1, 1, (pad[0], pad[1], pad[0], pad[1]))[0]
        elif down == 2:
            p = (fir.shape[0] - 2) + (k - 1)
            pad = ((p + 1) // 2, p // 2)
            xb = upfirdn2d(x[s][None], fir, 1, 1, (pad[0], pad[1], pad[0], pad[1]))[0]
            y = conv2d(xb, w, 2, 0)
        else:
            y = conv2d(x[s], w, 1, k // 2)
        outs.append(y)
    return np.stack(outs)
