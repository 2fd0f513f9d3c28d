"""Convolution, max pooling and nearest-neighbour upsampling on NCHW arrays.

Shape letters used below:
    N batch, C input channels, H W input height and width,
    O output channels, G groups, KH KW kernel size, SH SW stride, PH PW padding,
    OH OW output height and width, L = OH * OW output positions.

Convolution as one matrix product (im2col): for every output position, gather
the C x KH x KW input values its kernel window covers into one column. A
convolution is then (O, C*KH*KW) weights times (C*KH*KW, L) columns. The
gathering needs no Python loop over pixels: ``window_view`` builds the columns
as a strided *view* of the input (no copy), one reshape copies them out.
"""

from minidet.autograd import Function
from minidet.backend import get_array_module


def _pair(value, name):
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def output_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def window_view(x, kernel, stride):
    """Every KH x KW window of ``x`` (N, C, H, W) as a view of shape (N, C, KH, KW, OH, OW).

    ``view[n, c, i, j, oh, ow] == x[n, c, oh * SH + i, ow * SW + j]``: moving one
    step in ``i`` moves one row in ``x``, one step in ``oh`` moves SH rows. The windows overlap, so the view is
    only ever read: a write through it would change every window that shares the element. (CuPy's ``as_strided``
    has no ``writeable`` flag to enforce that.)
    """
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    s_n, s_c, s_h, s_w = x.strides
    return get_array_module(x).lib.stride_tricks.as_strided(
        x, shape=(n, c, kh, kw, oh, ow), strides=(s_n, s_c, s_h, s_w, s_h * sh, s_w * sw))


def _pad_hw(x, padding, value=0):
    ph, pw = padding
    if ph == pw == 0:
        return x
    return get_array_module(x).pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _unpad_hw(x, padding):
    ph, pw = padding
    return x[:, :, ph:x.shape[2] - ph, pw:x.shape[3] - pw]


def kernel_taps(padded, kernel, stride, out_size, channels_last=False):
    """Tap (i, j) of every window, in order: (i, j, padded[:, :, oh * SH + i, ow * SW + j] for all (oh, ow)), or
    (i, j, padded[:, oh * SH + i, ow * SW + j, :]) for a ``channels_last`` array (N, H, W, C).

    Each tap is one strided slice with the output's shape, (N, C, OH, OW) or (N, OH, OW, C). Ops that combine the
    taps one by one (depthwise convolution, max pooling) touch output-sized arrays only, where gathering every
    window first would copy the input KH * KW / (SH * SW) times.
    """
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, out_size
    leading = (slice(None),) if channels_last else (slice(None), slice(None))
    for i in range(kh):
        for j in range(kw):
            yield i, j, padded[leading + (slice(i, i + sh * oh, sh), slice(j, j + sw * ow, sw))]


CACHE_LINE_BYTES = 64


def _batch_last(x, padding):
    """x (N, C, H, W) copied into a zero-padded (C, H + 2PH, W + 2PW, N) array: the convolution's working layout."""
    n, c, h, w = x.shape
    ph, pw = padding
    padded = get_array_module(x).zeros((c, h + 2 * ph, w + 2 * pw, n), dtype=x.dtype)
    padded[:, ph:ph + h, pw:pw + w] = x.transpose(1, 2, 3, 0)
    return padded


class Conv2d(Function):
    """Convolution as matrix products, the whole batch in each product, on a batch-last copy of the input.

    The columns are laid out (G, C/G*KH*KW, L*N): column (oh, ow, n) holds the window of output position (oh, ow)
    in image n. So the forward is one (O/G, C/G*KH*KW) x (C/G*KH*KW, L*N) product per group, not one small product
    per image: a few large products run much faster than many small ones (each call to the BLAS library has a
    fixed cost, and with several threads wakes them all).

    Why batch-last: the input is first copied, padded, to (C, H + 2PH, W + 2PW, N). Then in every window row the
    OW positions times the N images are one contiguous run of memory (for stride 1), so the im2col copy (and
    col2im's additions in the backward) move long runs, not runs of OW values: on the small maps of the coarse
    pyramid levels (8 x 8 down to 1 x 1) that is several times faster. The price is transposing output-sized
    arrays (N, O, OH, OW) <-> (O, OH, OW, N), small next to the columns. With a stride, a window's runs are only N
    values long; for small batches the input is then split into its phases first (``_strided_columns``).

    The backward has two ways to the input's gradient: ``_col2im``, the textbook inverse of the forward's gathering,
    and, for stride 1, ``_input_gradient_by_flipped_kernel``, the same gradient as a convolution of dL/dy, faster on
    this model's layers (``_flipping_pays`` says when). A test holds the two equal.
    """

    def __init__(self, stride, padding, groups):
        self.stride, self.padding, self.groups = stride, padding, groups

    def _phase_of_tap(self, i, j):
        """Tap (i, j) of a stride (SH, SW) kernel reads phase (i % SH, j % SW) of the input, shifted by
        (i // SH, j // SW): x[oh*SH + i] = x[SH*(oh + i // SH) + i % SH]."""
        (sh, sw) = self.stride
        return (i % sh, j % sw), (i // sh, j // sw)

    def _strided_columns(self, padded, kh, kw):
        """The columns (C, KH, KW, OH, OW, N) of a strided convolution, from the input's phases.

        In the batch-last layout a strided window reads runs of only N values (the images of one pixel, then a jump
        of SW pixels). So the input is first split into its SH x SW phases, padded[:, a::SH, b::SW] (one copy of the
        input in all); every tap then reads a stride-1 slice of one phase, runs of OW * N values.
        """
        (sh, sw), (c, hp, wp, n) = self.stride, padded.shape
        oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
        xp = get_array_module(padded)
        phases = {(a, b): xp.ascontiguousarray(padded[:, a::sh, b::sw]) for a in range(min(sh, kh))
                  for b in range(min(sw, kw))}
        cols = xp.empty((c, kh, kw, oh, ow, n), dtype=padded.dtype)
        for i in range(kh):
            for j in range(kw):
                phase, (di, dj) = self._phase_of_tap(i, j)
                cols[:, i, j] = phases[phase][:, di:di + oh, dj:dj + ow]         # (C, OH, OW, N)
        return cols

    def forward(self, x, w, b=None):
        n = x.shape[0]
        o, c_per_group, kh, kw = w.shape
        g = self.groups
        xp = get_array_module(x)
        self.x_shape, self.w_shape = x.shape, w.shape
        padded = _batch_last(x, self.padding)                                   # (C, H + 2PH, W + 2PW, N)
        # A strided window's runs are N values long; below one cache line (64 bytes) of them, most of each memory
        # access is wasted, and splitting the input into phases first is faster. Measured, stride 2, 64 -> 128
        # channels on 128 x 128: 0.87-0.97x the time for 1-8 float32 images, 1.05x for 16.
        self.use_phases = self.stride != (1, 1) and n * x.itemsize < CACHE_LINE_BYTES
        if not self.use_phases:
            windows = window_view(padded.transpose(3, 0, 1, 2), (kh, kw), self.stride)   # (N, C, KH, KW, OH, OW)
            oh, ow = windows.shape[-2:]
            cols = windows.transpose(1, 2, 3, 4, 5, 0)                         # (C, KH, KW, OH, OW, N), a view
        else:
            cols = self._strided_columns(padded, kh, kw)                        # (C, KH, KW, OH, OW, N)
            oh, ow = cols.shape[3:5]
        self.cols = cols.reshape(g, c_per_group * kh * kw, oh * ow * n)        # copies the view; phases' as is
        self.w_mat = w.reshape(g, o // g, c_per_group * kh * kw)                # (G, O/G, C/G*KH*KW)
        y = xp.matmul(self.w_mat, self.cols)                                    # (G, O/G, L*N)
        y = xp.ascontiguousarray(y.reshape(o, oh, ow, n).transpose(3, 0, 1, 2))  # (N, O, OH, OW)
        if b is not None:
            y += b.reshape(1, o, 1, 1)
        return y

    def backward(self, gy):
        need_x, need_w = self.needs_input_grad[:2]
        n, o, oh, ow = gy.shape
        g = self.groups
        xp = get_array_module(gy)
        gy_mat = gy.transpose(1, 2, 3, 0).reshape(g, o // g, oh * ow * n)       # (G, O/G, L*N), a copy
        gx = gw = None
        if need_w:
            # dL/dW = dL/dY (O/G, L*N) times the columns transposed (L*N, C/G*KH*KW): the sum over images and
            # positions is the inner dimension of the product. It is computed transposed, the columns times dL/dY
            # transposed: the same sums, but OpenBLAS takes 0.5-0.8x the time for it on the demo's long, thin
            # matrices and 0.8-1.0x on larger layers (measured at 1 and 2 threads).
            gw_t = self.cols @ gy_mat.swapaxes(-1, -2)                           # (G, C/G*KH*KW, O/G)
            gw = xp.ascontiguousarray(gw_t.swapaxes(-1, -2)).reshape(self.w_shape)
        if need_x:
            if self._flipping_pays():
                gx = self._input_gradient_by_flipped_kernel(gy)
            else:
                gx = self._col2im(gy_mat, oh, ow)
        if len(self.needs_input_grad) == 2:
            return gx, gw
        gb = gy.sum(axis=(0, 2, 3)) if self.needs_input_grad[2] else None
        return gx, gw, gb

    def _col2im(self, gy_mat, oh, ow):
        """dL/dx the textbook way: dL/dcolumns = W transposed times dL/dY, then col2im adds each column back onto the
        pixels it was read from, one strided slice per kernel tap (i, j), in the padded batch-last layout of the
        forward. ``gy_mat`` is dL/dY as (G, O/G, L*N), for an output of OH x OW."""
        n, c, h, w = self.x_shape
        o, c_per_group, kh, kw = self.w_shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        xp = get_array_module(gy_mat)
        gcols = (self.w_mat.swapaxes(-1, -2) @ gy_mat).reshape(c, kh, kw, oh, ow, n)
        gx = xp.zeros((c, h + 2 * ph, w + 2 * pw, n), dtype=gy_mat.dtype)     # (C, H + 2PH, W + 2PW, N)
        if not self.use_phases:
            for i in range(kh):
                for j in range(kw):
                    gx[:, i:i + sh * oh:sh, j:j + sw * ow:sw] += gcols[:, i, j]   # (C, OH, OW, N)
        else:
            # Into each phase's gradient with stride-1 slices (long runs), then each phase into its pixels.
            phases = {(a, b): xp.zeros(gx[:, a::sh, b::sw].shape, dtype=gy_mat.dtype) for a in range(min(sh, kh))
                      for b in range(min(sw, kw))}
            for i in range(kh):
                for j in range(kw):
                    phase, (di, dj) = self._phase_of_tap(i, j)
                    phases[phase][:, di:di + oh, dj:dj + ow] += gcols[:, i, j]
            for (a, b), phase_gradient in phases.items():
                gx[:, a::sh, b::sw] = phase_gradient
        return xp.ascontiguousarray(gx[:, ph:ph + h, pw:pw + w].transpose(3, 0, 1, 2))   # (N, C, H, W)

    def _flipping_pays(self):
        """Whether ``_input_gradient_by_flipped_kernel`` applies (stride 1, padding below the kernel size) and is
        taken: not for a 1 x 1 kernel, whose col2im is a single addition. Measured on a 2-core CPU, the input gradient
        alone, float32: 0.54-0.87x col2im's time on the demo's 3 x 3 layers (16-64 channels, batch 16) and on
        4 x 64 x 64 x 64, but 1.03-1.06x on 128 and 256 channels with few positions, where it is taken all the same
        (one rule, and the demo's layers are the ones that count); whole 1 x 1 layers 1.1-1.2x."""
        (kh, kw), (ph, pw) = self.w_shape[2:], self.padding
        return self.stride == (1, 1) and (kh, kw) != (1, 1) and ph < kh and pw < kw

    def _input_gradient_by_flipped_kernel(self, gy):
        """dL/dx of a stride-1 convolution as a convolution of dL/dy, without col2im.

        y[o, oh, ow] = sum over (c, i, j) of w[o, c, i, j] * x_pad[c, oh + i, ow + j], so each input pixel gets

            dx_pad[c, r, s] = sum over (o, i, j) of w[o, c, i, j] * gy[o, r - i, s - j],

        a convolution of dL/dy (zero outside the output) with the kernel flipped in both directions (i -> KH-1-i,
        j -> KW-1-j) and its in and out channels swapped. Padding dL/dy by KH-1-PH (KW-1-PW) gives dL/dx itself,
        without the padding's border. One im2col copy and one product replace col2im's KH * KW additions of
        column-sized slices, which move more memory.
        """
        n, c, h, w = self.x_shape
        o, c_per_group, kh, kw = self.w_shape
        g, (ph, pw) = self.groups, self.padding
        xp = get_array_module(gy)
        padded = _batch_last(gy, (kh - 1 - ph, kw - 1 - pw))                   # (O, H + KH-1, W + KW-1, N)
        windows = window_view(padded.transpose(3, 0, 1, 2), (kh, kw), (1, 1))  # (N, O, KH, KW, H, W)
        cols = windows.transpose(1, 2, 3, 4, 5, 0).reshape(g, o // g * kh * kw, h * w * n)
        flipped = self.w_mat.reshape(g, o // g, c_per_group, kh, kw)[..., ::-1, ::-1]
        flipped = flipped.transpose(0, 2, 1, 3, 4).reshape(g, c_per_group, o // g * kh * kw)
        gx = xp.matmul(flipped, cols).reshape(c, h, w, n)
        return xp.ascontiguousarray(gx.transpose(3, 0, 1, 2))                  # (N, C, H, W)


class DepthwiseConv2d(Function):
    """A depthwise convolution (groups = C = O: one KH x KW filter per channel), tap by tap.

    As im2col it would be C products of (1, KH*KW) x (KH*KW, L*N) rows: all copying and no arithmetic to speak of.
    Instead each kernel tap (i, j) is one strided slice of the padded input (``kernel_taps``), scaled by that tap's
    weight per channel and added up: y = sum over (i, j) of w[:, i, j] * x_pad[:, i::SH, j::SW, :].

    Two choices make that fast on a CPU (about 3x faster than the same sum over NCHW arrays, whole batch at once):
    - **channels last**: the input is copied once, padded, to (N, H + 2PH, W + 2PW, C), so every tap's slice is
      made of whole pixels, runs of C contiguous values, and a tap's C weights line up with them; in NCHW a
      stride-2 tap reads every other value, and a 4 x 4 map has runs of 4.
    - **a few images at a time** (``CHUNK_BYTES`` of input): the KH * KW passes over the same slice then run in the
      core's cache instead of main memory.
    """

    CHUNK_BYTES = 1 << 18

    def __init__(self, stride, padding):
        self.stride, self.padding = stride, padding

    def _chunks(self, *arrays):
        """The same few images of each batch-first array: enough for CHUNK_BYTES of the padded input."""
        images = max(1, self.CHUNK_BYTES // self.padded[0].nbytes)
        for start in range(0, len(self.padded), images):
            yield [array[start:start + images] for array in arrays]

    def forward(self, x, w, b=None):
        xp = get_array_module(x)
        (n, c, h, width), (kh, kw), (sh, sw), (ph, pw) = x.shape, w.shape[2:], self.stride, self.padding
        self.padded = xp.zeros((n, h + 2 * ph, width + 2 * pw, c), dtype=x.dtype)    # (N, HP, WP, C)
        self.padded[:, ph:ph + h, pw:pw + width] = x.transpose(0, 2, 3, 1)
        self.w = w[:, 0].transpose(1, 2, 0).copy()                                   # (KH, KW, C)
        out_size = ((h + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1)
        y = xp.empty((n, *out_size, c), dtype=x.dtype)                               # (N, OH, OW, C)
        for part, out in self._chunks(self.padded, y):
            product = xp.empty_like(out)
            for i, j, tap in kernel_taps(part, (kh, kw), self.stride, out_size, channels_last=True):
                xp.multiply(tap, self.w[i, j], out=product if i or j else out)
                if i or j:
                    out += product
        if b is not None:
            y += b
        return xp.ascontiguousarray(y.transpose(0, 3, 1, 2))

    def backward(self, gy):
        xp = get_array_module(gy)
        kh, kw, c = self.w.shape
        need_x, need_w = self.needs_input_grad[:2]
        gy_last = xp.ascontiguousarray(gy.transpose(0, 2, 3, 1))                     # (N, OH, OW, C)
        gx = xp.zeros_like(self.padded)
        gw = xp.zeros((kh, kw, c), dtype=gy.dtype)
        for part, gy_part, gx_part in self._chunks(self.padded, gy_last, gx):
            product = xp.empty_like(gy_part)
            taps = kernel_taps(part, (kh, kw), self.stride, gy.shape[2:], channels_last=True)
            gx_taps = kernel_taps(gx_part, (kh, kw), self.stride, gy.shape[2:], channels_last=True)
            for (i, j, tap), (_, _, gx_tap) in zip(taps, gx_taps):
                if need_w:
                    xp.multiply(gy_part, tap, out=product)
                    gw[i, j] += product.reshape(-1, c).sum(axis=0)                  # over images and pixels
                if need_x:
                    xp.multiply(gy_part, self.w[i, j], out=product)
                    gx_tap += product
        ph, pw = self.padding
        hp, wp = self.padded.shape[1:3]
        gx = xp.ascontiguousarray(gx[:, ph:hp - ph, pw:wp - pw].transpose(0, 3, 1, 2)) if need_x else None
        gw = gw.transpose(2, 0, 1)[:, None].copy() if need_w else None               # (C, 1, KH, KW)
        if len(self.needs_input_grad) == 2:
            return gx, gw
        return gx, gw, gy_last.reshape(-1, c).sum(axis=0) if self.needs_input_grad[2] else None


def conv2d(input, weight, bias=None, stride=1, padding=0, groups=1):
    """2-D convolution (cross-correlation, as in every deep learning library).

    Args:
        input: (N, C, H, W).
        weight: (O, C / groups, KH, KW).
        bias: (O,) or None.
        stride, padding: an int or an (H, W) pair; zero padding on both sides.
        groups: split the C input and O output channels into this many groups,
            each convolved separately (groups = C is a depthwise convolution).
    Returns:
        (N, O, OH, OW) with OH = (H + 2 PH - KH) // SH + 1, and the same for OW.
    """
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    if input.ndim != 4 or weight.ndim != 4:
        raise ValueError(f"conv2d: input must be (N, C, H, W) and weight (O, C/groups, KH, KW), got shapes "
                         f"{input.shape} and {weight.shape}")
    c, (o, c_per_group, kh, kw) = input.shape[1], weight.shape
    if c % groups or o % groups or c // groups != c_per_group:
        raise ValueError(f"conv2d: input has {c} channels and weight {tuple(weight.shape)}, which does not "
                         f"fit groups={groups} (weight needs shape (O, {c}/groups, KH, KW), O divisible by groups)")
    dtypes = {str(a.dtype) for a in (input, weight, bias) if a is not None}
    if len(dtypes) > 1:
        raise TypeError(f"conv2d: input, weight and bias must share one dtype, got {sorted(dtypes)}; "
                        "convert them first, e.g. minidet.tensor(array, dtype=numpy.float32)")
    if bias is not None and tuple(bias.shape) != (o,):
        raise ValueError(f"conv2d: bias must have shape ({o},), got {tuple(bias.shape)}")
    h, w = input.shape[2:]
    if output_size(h, kh, stride[0], padding[0]) < 1 or output_size(w, kw, stride[1], padding[1]) < 1:
        raise ValueError(f"conv2d: a {kh}x{kw} kernel does not fit the {h}x{w} input with padding {padding}")
    args = (input, weight) if bias is None else (input, weight, bias)
    if groups > 1 and groups == c == o:                       # depthwise: one filter per channel
        return DepthwiseConv2d(stride, padding)(*args)
    return Conv2d(stride, padding, groups)(*args)


class MaxPool2d(Function):
    """The max over each window, taken one kernel tap at a time.

    Tap (i, j) of every window is one strided slice of the padded input, with the output's shape; the max of the
    KH * KW slices is the output. The backward needs the tap that gave each max, the first one where several tie
    (as torch). See ``kernel_taps``.
    """

    def __init__(self, kernel, stride, padding):
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def forward(self, x):
        xp = get_array_module(x)
        padded = _pad_hw(x, self.padding, -xp.inf)
        self.padded_shape = padded.shape
        (kh, kw), (sh, sw) = self.kernel, self.stride
        out_size = ((padded.shape[2] - kh) // sh + 1, (padded.shape[3] - kw) // sw + 1)
        taps = [tap for _, _, tap in kernel_taps(padded, self.kernel, self.stride, out_size)]
        y = taps[0].copy()                                                      # (N, C, OH, OW)
        for tap in taps[1:]:
            xp.maximum(y, tap, out=y)                                           # a NaN in a window stays
        # The first tap that reaches the max: weight tap t by T - t where it does (T taps); the largest weight w
        # marks the first such tap, T - w. "Not below the max" rather than "equal to it", so that a window whose
        # max is NaN sends its gradient to its first tap instead of nowhere.
        count = len(taps)
        first = xp.zeros(y.shape, dtype=xp.int16)
        below = xp.empty(y.shape, dtype=bool)
        for t, tap in enumerate(taps):
            xp.less(tap, y, out=below)
            xp.maximum(first, ~below * xp.int16(count - t), out=first)
        self.argmax = count - first                                             # (N, C, OH, OW)
        return y

    def backward(self, gy):
        # Each output's gradient goes to the tap that gave its max; windows overlap, so the taps add up.
        xp = get_array_module(gy)
        gx = xp.zeros(self.padded_shape, dtype=gy.dtype)
        for t, (_, _, tap) in enumerate(kernel_taps(gx, self.kernel, self.stride, gy.shape[2:])):
            tap += gy * (self.argmax == t)
        return _unpad_hw(gx, self.padding)


def max_pool2d(input, kernel_size, stride=None, padding=0):
    """Max over KH x KW windows of (N, C, H, W); ``stride`` defaults to ``kernel_size``."""
    kernel = _pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else _pair(stride, "stride")
    padding = _pair(padding, "padding")
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"max_pool2d: padding {padding} must be at most half the kernel {kernel}")
    return MaxPool2d(kernel, stride, padding)(input)


class UpsampleNearest(Function):
    """Nearest-neighbour upsampling by whole factors (SH, SW): each input pixel becomes an SH x SW block of copies
    (``F.interpolate``'s op; the pyramid's top-down path doubles each level with it)."""

    def __init__(self, scale):
        self.scale = scale

    def forward(self, x):
        (sh, sw), (n, c, h, w) = self.scale, x.shape
        # Each pixel becomes an SH x SW block: broadcast over two new axes, then merge them in.
        blocks = get_array_module(x).broadcast_to(x[:, :, :, None, :, None], (n, c, h, sh, w, sw))
        return blocks.reshape(n, c, h * sh, w * sw)

    def backward(self, gy):
        # Each input pixel fed an SH x SW block of outputs, so its gradient is that block's sum. It is added up one
        # offset (i, j) of the blocks at a time, a strided slice each: NumPy does that over ten times faster than
        # blocks.sum(axis=(3, 5)), whose summed axes are short and interleaved with the kept ones.
        (sh, sw), (n, c, oh, ow) = self.scale, gy.shape
        blocks = gy.reshape(n, c, oh // sh, sh, ow // sw, sw)                    # (N, C, H, SH, W, SW)
        gx = blocks[:, :, :, 0, :, 0].copy()                                    # (N, C, H, W)
        for i in range(sh):
            for j in range(sw):
                if i or j:
                    gx += blocks[:, :, :, i, :, j]
        return gx


def interpolate(input, size=None, scale_factor=None, mode="nearest"):
    """Nearest-neighbour upsampling of (N, C, H, W) by whole-number factors.

    Give either ``scale_factor`` (an int or an (H, W) pair of ints) or ``size``
    (an (OH, OW) pair that is a whole multiple of (H, W)). The feature pyramid
    only ever doubles, so other modes and fractional scales are not offered.
    """
    if mode != "nearest":
        raise ValueError(f"interpolate: only mode='nearest' is implemented, got {mode!r}")
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate: give exactly one of size and scale_factor")
    h, w = input.shape[2:]
    if size is not None:
        oh, ow = _pair(size, "size")
        if oh % h or ow % w:
            raise ValueError(f"interpolate: size {(oh, ow)} is not a whole multiple of the input size {(h, w)}")
        scale = (oh // h, ow // w)
    else:
        scale = _pair(scale_factor, "scale_factor")
    if min(scale) < 1:
        raise ValueError(f"interpolate: scale factors must be at least 1, got {scale}")
    return UpsampleNearest(scale)(input)
