"""Engine: the prepared, bucketed, cached, micro-batched path must reproduce the plain
fp32 Stylizer (noise="zero") for every style source."""
import copy
import ctypes
import platform
import threading

import pytest
import torch

from mmfs_fast.engine import Engine, LRUCache
from mmfs_fast.models.inference import _conv_layer, _form_for, _StemConv, _StyledConv, _StyleTable, prepare_stylizer
from mmfs_fast import benchmark as mb
from mmfs_fast.models.layers import ConvLayer, ModulatedConv2d, StyledConv
from mmfs_fast.models.stylizer import Stylizer

SIZE, DIM = 64, 32
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def randomise_biases(model: Stylizer, seed: int = 0) -> Stylizer:
    """Freshly initialised biases and noise strengths are zero; random ones exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("noise.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def make_stylizer(style_dim: int = DIM, seed: int = 0) -> Stylizer:
    torch.manual_seed(seed)
    return randomise_biases(Stylizer(size=SIZE, ngf=4, style_dim=style_dim), seed).eval()


def faces(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def seed_z(seeds, dim: int = DIM) -> torch.Tensor:
    return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(s)) for s in seeds])


def assert_images_close(actual, expected, atol=2e-5):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def stylizer():
    return make_stylizer()


@pytest.fixture(scope="module")
def engine(stylizer):
    return Engine(stylizer, device="cpu")


@pytest.fixture(scope="module")
def clip_setup():
    """The real CLIP encoder (random weights) with a Stylizer whose clip_mapper takes its 512-d features."""
    from mmfs_fast.encoders import CLIPEncoder

    stylizer = make_stylizer(style_dim=512, seed=3)
    clip = CLIPEncoder(random_init=True)
    return stylizer, clip, Engine(stylizer, clip=clip, device="cpu", style_cache_size=8)


@torch.no_grad()
def test_seed_styles_match_plain_stylizer(stylizer, engine):
    x = faces(3)
    w_plus = engine.style_from_seed([5, 6, 7])
    assert w_plus.shape == (3, 10, DIM)
    torch.testing.assert_close(w_plus, stylizer.style_from_z(seed_z([5, 6, 7])))
    assert_images_close(engine.stylize(x, w_plus), stylizer(x, z=seed_z([5, 6, 7]), noise="zero"))


@torch.no_grad()
@pytest.mark.parametrize("options", [{"compile": True}, {"upsample_form": "polyphase"}, {"downsample_form": "folded"}],
                         ids=["compiled", "polyphase", "folded-downsampling"])
def test_engine_variants_match_plain_stylizer(stylizer, options):
    """compile=True, which traces the prepared model (style table, folded epilogues, in-place
    activations); the upsampling convolutions in their polyphase form; the encoder's blurs
    folded into its strided convolutions."""
    x, w_plus = faces(3), torch.randn(3, 10, DIM)
    engine = Engine(stylizer, device="cpu", **options)
    assert_images_close(engine.stylize(x, w_plus), stylizer(x, w_plus=w_plus, noise="zero"))


@torch.no_grad()
@pytest.mark.parametrize("stem_form", ["separate", "fused"])
@pytest.mark.parametrize("conv_adds_bias", [True, False], ids=["cpu-form", "cuda-form"])
def test_prepared_encoder_matches_plain_encoder(stylizer, conv_adds_bias, stem_form):
    """Both forms of the folded ConvLayer: the convolution's own bias + in-place leaky ReLU (the
    Engine's choice on the CPU), the bias_act op (on CUDA); the first layer, on the RGB face, in
    both of its forms (fused: the stem_conv op), and only that layer a stem."""
    encoder = prepare_stylizer(stylizer, torch.float32, "auto", conv_adds_bias=conv_adds_bias,
                               stem_form=stem_form).encoder
    kinds = {type(m).__name__ for m in encoder.modules()}
    assert ("LeakyReLU" in kinds) == conv_adds_bias and ("_BiasLeakyReLU" in kinds) != conv_adds_bias
    assert [name for name, m in encoder.named_modules() if isinstance(m, _StemConv)] == ["0"]
    assert encoder[0].form == stem_form
    x = faces(2)
    torch.testing.assert_close(encoder(x), stylizer.encoder(x), rtol=1e-5, atol=1e-5)


def test_stem_form_auto_is_the_training_form_on_the_cpu_and_a_stem_is_checked(stylizer):
    stem = prepare_stylizer(stylizer, torch.float32, "auto").encoder[0]
    assert _form_for("stem", stem.form, torch.empty(1, 3, 8, 8), 1) == "separate"
    with pytest.raises(ValueError, match="stem_form must be"):
        prepare_stylizer(stylizer, torch.float32, "auto", stem_form="im2col")
    with pytest.raises(ValueError, match="a stem is a stride-1"):
        _conv_layer(ConvLayer(8, 8, 3), torch.float32, False, stem_form="fused")


@torch.no_grad()
@pytest.mark.parametrize("channels_last", [None, False], ids=["default", "nchw"])
def test_both_layouts_match_plain_stylizer(stylizer, channels_last):
    """NHWC is the CPU default (measured faster there); NCHW on request."""
    x, w_plus = faces(2), torch.randn(2, 10, DIM)
    engine = Engine(stylizer, device="cpu", channels_last=channels_last)
    nhwc = engine.model.synthesis.blocks[0][0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc == (channels_last is None) and engine.encode(x).is_contiguous(memory_format=engine.memory_format)
    assert_images_close(engine.stylize(x, w_plus), stylizer(x, w_plus=w_plus, noise="zero"))
    feats = engine.encode(x)
    assert_images_close(engine.decode(feats, w_plus), stylizer.decode(stylizer.encode(x), w_plus, noise="zero"))


def test_cudnn_benchmark_only_around_the_engines_runs(stylizer, monkeypatch):
    assert torch.backends.cudnn.benchmark is False
    for enabled in (True, False):
        engine = Engine(stylizer, device="cpu", cudnn_benchmark=enabled)
        seen, run = [], engine._executor.run
        monkeypatch.setattr(engine._executor, "run", lambda *args: seen.append(torch.backends.cudnn.benchmark) or run(*args))
        engine.stylize(faces(1), torch.randn(1, 10, DIM))
        assert seen == [enabled] and torch.backends.cudnn.benchmark is False


@torch.no_grad()
def test_encode_decode_match_plain_stylizer(stylizer, engine):
    x, w_plus = faces(2), torch.randn(2, 10, DIM)
    feats = engine.encode(x)
    torch.testing.assert_close(feats, stylizer.encode(x), rtol=0, atol=1e-5)
    assert_images_close(engine.decode(feats, w_plus), stylizer.decode(stylizer.encode(x), w_plus, noise="zero"))


@torch.no_grad()
def test_random_noise_matches_stylizer_given_the_same_noise(stylizer, engine):
    x, w_plus = faces(2), torch.randn(2, 10, DIM)
    torch.manual_seed(11)
    out = engine.stylize(x, w_plus, noise="random")
    torch.manual_seed(11)
    noises = [torch.randn(2, 1, r, r) for r in stylizer.noise_resolutions]
    assert_images_close(out, stylizer(x, w_plus=w_plus, noise=noises))
    shared = [n[:1] for n in noises]  # explicit maps, one per layer, broadcast over the batch
    assert_images_close(engine.stylize(x, w_plus, noise=shared), stylizer(x, w_plus=w_plus, noise=shared))
    assert (out - engine.stylize(x, w_plus)).abs().max() > 1e-3  # the noise strengths are non-zero


@torch.no_grad()
def test_text_and_reference_styles_match_plain_stylizer(clip_setup):
    stylizer, clip, engine = clip_setup
    x = faces(2)
    texts = ["a watercolor portrait", "a 3d cartoon"]
    torch.testing.assert_close(engine.style_from_text(texts), stylizer.map_clip(clip.encode_text(texts)),
                               rtol=0, atol=1e-5)
    assert_images_close(engine.stylize(x, engine.style_from_text(texts)),
                        stylizer(x, clip_feats=clip.encode_text(texts), noise="zero"))
    refs = faces(2, seed=9)
    torch.testing.assert_close(engine.style_from_image(refs), stylizer.map_clip(clip.encode_image(refs)),
                               rtol=0, atol=1e-5)


@torch.no_grad()
def test_seed_and_render_in_one_call_equal_style_then_render(stylizer, engine):
    x = faces(3)
    separate = engine.stylize(x, engine.style_from_seed([5, 6, 7]))
    torch.testing.assert_close(engine.stylize_seed(x, [5, 6, 7]), separate, rtol=0, atol=1e-6)
    torch.testing.assert_close(engine.stylize_z(x, seed_z([5, 6, 7])), separate, rtol=0, atol=1e-6)
    assert_images_close(engine.stylize_seed(x, [5, 6, 7]), stylizer(x, z=seed_z([5, 6, 7]), noise="zero"))
    with pytest.raises(ValueError, match="z"):
        engine.stylize_z(x, seed_z([5, 6]))


@torch.no_grad()
def test_text_and_reference_image_and_render_in_one_call_equal_style_then_render(clip_setup):
    stylizer, clip, engine = clip_setup
    x, refs = faces(2), faces(2, seed=9)
    texts = ["a pop art portrait", "an oil painting"]
    torch.testing.assert_close(engine.stylize_text(x, texts), engine.stylize(x, engine.style_from_text(texts)),
                               rtol=0, atol=1e-6)
    # the cache maps the repeated prompt once (batch 1 there, 2 here): CPU kernels differ by rounding
    assert_images_close(engine.stylize_text(x, "a sketch"), engine.stylize(x, engine.style_from_text(["a sketch"] * 2)))
    torch.testing.assert_close(engine.stylize_image(x, refs), engine.stylize(x, engine.style_from_image(refs)),
                               rtol=0, atol=1e-6)
    assert_images_close(engine.stylize_image(x, refs), stylizer(x, clip_feats=clip.encode_image(refs), noise="zero"),
                        atol=1e-4)
    with pytest.raises(ValueError, match="3 prompts for 2 faces"):
        engine.stylize_text(x, ["a", "b", "c"])


def test_style_and_render_asked_together_are_one_graph(clip_setup, monkeypatch):
    """In graph mode each combined call captures (and replays) one graph per bucket: the style
    networks inside the render's graph, no style graph of their own. The capture itself needs
    CUDA; here it is recorded and the call runs eagerly."""
    from mmfs_fast.engine.executor import Executor

    stylizer, clip, _ = clip_setup
    engine = Engine(stylizer, clip=clip, device="cpu", buckets=(1, 2), style_cache_size=0)
    captured = []
    monkeypatch.setattr(engine._executor, "mode", "graph")
    monkeypatch.setattr(Executor, "_graph", lambda self, name, fn, bucket, inputs: captured.append((name, bucket)))
    x = faces(2)
    with torch.no_grad():
        engine.stylize_seed(x[:1], [3])
        engine.stylize_text(x, "a sketch")
        engine.stylize_image(x, faces(2, seed=4))
    assert captured == [("seed_stylize", 1), ("text_stylize", 2), ("image_stylize", 2)]


def test_bucket_padding_and_splitting_return_the_unpadded_results(stylizer, engine):
    x, w_plus = faces(7), torch.randn(7, 10, DIM)
    unpadded = engine.stylize(x, w_plus)
    bucketed = Engine(stylizer, device="cpu", buckets=(2, 4))  # 7 → 4 + 3 padded to 4
    assert bucketed.buckets == (2, 4)
    # rows are independent; only the BLAS blocking of a different batch size may move the last bit
    assert_images_close(bucketed.stylize(x, w_plus), unpadded, atol=1e-5)
    assert_images_close(bucketed.stylize(x[:1], w_plus[:1]), unpadded[:1], atol=1e-5)


def test_concurrent_submit_returns_each_caller_its_own_result(clip_setup):
    stylizer, clip, _ = clip_setup
    x = faces(8, seed=4)
    w = torch.randn(10, 512)
    refs = faces(2, seed=5)
    styles = [0, "a pencil sketch", w, refs[0], 1, "an oil painting", refs[1], 2]
    with Engine(stylizer, clip=clip, device="cpu", max_batch=8, max_wait_ms=50) as engine:
        w_plus = torch.cat([engine.style_from_seed([0]), engine.style_from_text(["a pencil sketch"]), w[None],
                            engine.style_from_image(refs[:1]), engine.style_from_seed([1]),
                            engine.style_from_text(["an oil painting"]), engine.style_from_image(refs[1:]),
                            engine.style_from_seed([2])])
        expected = [engine.stylize(x[i:i + 1], w_plus[i:i + 1])[0] for i in range(8)]
        results = [None] * 8

        def call(i):
            results[i] = engine.submit(x[i], styles[i]).result(timeout=120)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for got, want in zip(results, expected):
        assert_images_close(got, want)
    # the seed styles against the plain model, independently of the engine's own style path
    with torch.no_grad():
        ref = stylizer(x[[0, 4, 7]], z=seed_z([0, 1, 2], dim=512), noise="zero")
    for got, want in zip([results[0], results[4], results[7]], ref):
        assert_images_close(got, want)


def test_bad_requests_fail_alone(stylizer):
    x = faces(4)
    nan_w = torch.randn(10, DIM)
    nan_w[3, 4] = float("nan")
    good_w = torch.randn(10, DIM)
    with Engine(stylizer, device="cpu", max_batch=8, max_wait_ms=200, check_finite=True) as engine:
        futures = {
            "seed": engine.submit(x[0], 3),
            "wrong size": engine.submit(torch.zeros(3, 32, 32), 3),
            "nan w+": engine.submit(x[1], nan_w),
            "empty text": engine.submit(x[2], "  "),
            "no clip": engine.submit(x[2], "a sketch"),
            "bad type": engine.submit(x[3], 1.5),
            "bad noise": engine.submit(x[3], 3, noise="loud"),
            "w+": engine.submit(x[3], good_w),
        }
    errors = {name: f.exception(timeout=60) for name, f in futures.items()}
    assert errors["seed"] is None and errors["w+"] is None
    assert isinstance(errors["wrong size"], ValueError) and "(3, 64, 64)" in str(errors["wrong size"])
    assert isinstance(errors["nan w+"], ValueError) and "NaN" in str(errors["nan w+"])
    assert isinstance(errors["empty text"], ValueError) and "non-empty" in str(errors["empty text"])
    assert isinstance(errors["no clip"], RuntimeError) and "CLIP" in str(errors["no clip"])
    assert isinstance(errors["bad type"], TypeError)
    assert isinstance(errors["bad noise"], ValueError)
    with torch.no_grad():
        assert_images_close(futures["seed"].result(), stylizer(x[:1], z=seed_z([3]), noise="zero")[0])
        assert_images_close(futures["w+"].result(), stylizer(x[3:], w_plus=good_w[None], noise="zero")[0])


def test_close_drains_and_refuses_new_work(stylizer):
    engine = Engine(stylizer, device="cpu", max_batch=2, max_wait_ms=1)
    futures = [engine.submit(f, i) for i, f in enumerate(faces(5))]
    engine.close()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(faces(1)[0], 0)


def test_direct_calls_reject_bad_input(engine, stylizer):
    with pytest.raises(ValueError, match="shape"):
        engine.stylize(faces(2), torch.randn(3, 10, DIM))
    checking = Engine(stylizer, device="cpu", check_finite=True)
    with pytest.raises(ValueError, match="faces contains NaN"):
        checking.stylize(faces(1) * float("inf"), torch.randn(1, 10, DIM))
    with pytest.raises(ValueError, match="w_plus contains NaN"):
        checking.stylize(faces(1), torch.full((1, 10, DIM), float("nan")))
    assert engine.stylize(faces(1), torch.full((1, 10, DIM), float("nan"))).isnan().all()  # unchecked: NaN out
    with pytest.raises(ValueError, match="noise"):
        engine.stylize(faces(1), torch.randn(1, 10, DIM), noise="loud")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        engine.style_from_seed([-1])
    with pytest.raises(ValueError, match="fp16"):
        Engine(Stylizer(size=SIZE, ngf=4, style_dim=DIM), device="cpu", precision="fp16")


def test_lru_cache_bound_and_hits():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a becomes the most recent
    cache.put("c", 3)  # evicts b
    assert cache.get("b") is None and cache.get("c") == 3 and len(cache) == 2
    assert cache.stats() == {"size": 2, "capacity": 2, "hits": 2, "misses": 1}


@torch.no_grad()
def test_style_caches_hit_and_stay_bounded(clip_setup):
    stylizer, clip, _ = clip_setup
    engine = Engine(stylizer, clip=clip, device="cpu", style_cache_size=2)
    first = engine.style_from_text(["a", "b"])
    assert engine.text_cache.stats()["misses"] == 2
    again = engine.style_from_text(["b", "a", "b"])
    assert engine.text_cache.stats()["hits"] == 2  # "b" twice in one call is looked up once
    torch.testing.assert_close(again, first[[1, 0, 1]])
    engine.style_from_text(["c"])
    assert len(engine.text_cache) == 2
    refs = faces(3, seed=7)
    w = engine.style_from_image(refs, keys=["r0", "r1", "r2"])
    assert engine.image_cache.stats() == {"size": 2, "capacity": 2, "hits": 0, "misses": 3}
    torch.testing.assert_close(engine.style_from_image(refs[2:].clone(), keys=["r2"]), w[2:])  # the key: a hit
    assert engine.image_cache.stats()["hits"] == 1
    torch.testing.assert_close(engine.style_from_image(refs[2:]), w[2:])  # no key: computed, not cached
    assert engine.image_cache.stats()["hits"] == 1 and engine.image_cache.stats()["misses"] == 3
    with pytest.raises(ValueError, match="2 keys for 3 images"):
        engine.style_from_image(refs, keys=["a", "b"])


def assert_error_within_twice(out, plain, ref):
    """|out − ref| at most twice |plain − ref| in the mean, the 99.9th percentile and the
    maximum: an error confined to a border or a few pixels shows in the last two."""
    error, plain_error = (out.float() - ref).abs().flatten(), (plain.float() - ref).abs().flatten()
    for stat in (torch.mean, lambda e: torch.quantile(e, 0.999), torch.max):
        assert stat(error) <= 2 * stat(plain_error)


@torch.no_grad()
def test_bf16_error_within_twice_the_plain_model_cast_to_bf16(stylizer):
    x, w_plus = faces(4), torch.randn(4, 10, DIM)
    ref = stylizer(x, w_plus=w_plus, noise="zero")
    plain = make_stylizer().to(torch.bfloat16)(x.bfloat16(), w_plus=w_plus.bfloat16(), noise="zero")
    out = Engine(stylizer, device="cpu", precision="bf16").stylize(x, w_plus)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert_error_within_twice(out, plain, ref)


def prepared_styled_conv(layer: StyledConv, dtype: torch.dtype, upsample_form: str = "auto"):
    """One StyledConv's inference form with a style table of its own: (x, w) → its output, as
    the Engine's synthesis pass runs it (x scaled by the table's styles, then conv + epilogue)."""
    conv = _StyledConv(layer, dtype, upsample_form)
    table = _StyleTable([layer.conv], [conv.conv.energy()], [0])

    def run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles, demod, _ = table(w[:, None], x.dtype)
        return conv(x * styles[0].to(x.dtype)[:, :, None, None], demod[0], None)[0]
    return conv, run


@torch.no_grad()
@pytest.mark.parametrize("upsample", [False, True])
def test_fp16_modulation_is_safe_where_the_plain_fp16_layer_overflows(upsample):
    torch.manual_seed(0)
    layer = StyledConv(16, 8, 3, DIM, upsample=upsample).eval()  # the op: per-sample weights
    # styles ~1e5 exceed fp16's 65504 (the demodulation itself is fp32 everywhere: see
    # test_ops_ref's test_demodulation_stays_fp32)
    layer.conv.modulation.bias.fill_(1e5)
    layer.activate.bias.normal_()
    x, w = torch.randn(2, 16, 8, 8), torch.randn(2, DIM)
    ref = layer(x, w, None)
    plain = copy.deepcopy(layer).half()(x.half(), w.half(), None).float()
    assert not torch.allclose(plain, ref, atol=0.1, equal_nan=True)  # the plain cast's styles are inf
    prepared = prepared_styled_conv(layer, torch.float16)[1](x.half(), w)
    assert prepared.dtype == torch.float16
    torch.testing.assert_close(prepared.float(), ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def _decoder_upsampling_shapes(scale: int = 16) -> list[tuple[int, int, int]]:
    """(in channels, out channels, input size) of each upsampling convolution of the 512² decoder,
    read off a forward on the meta device; channels divided by ``scale`` (they do not enter the
    phases' taps and pads; the sizes do) to keep fp16 CPU convolutions quick."""
    shapes = []
    with torch.device("meta"), torch.no_grad():
        model = Stylizer(mb.FULL.stylizer).eval()
        for name, m in model.named_modules():
            if isinstance(m, ModulatedConv2d) and m.upsample:
                m.register_forward_pre_hook(lambda m, args: shapes.append(
                    (args[0].shape[1] // scale, m.weight.shape[1] // scale, args[0].shape[2])))
        model(torch.empty(1, 3, model.config.size, model.config.size), z=torch.empty(1, model.config.style_dim))
    return shapes


@torch.no_grad()
@pytest.mark.parametrize("in_ch,out_ch,size", _decoder_upsampling_shapes(), ids=lambda v: str(v))
def test_polyphase_upsampling_layer_equals_the_training_form(in_ch, out_ch, size):
    """The prepared upsampling StyledConv in polyphase form against the training layer
    (transposed conv + blur): to fp32 rounding in fp32; in fp16 within twice the error of the
    prepared transposed form (the blur in the epilogue) in fp16 (both against the layer in fp64)."""
    torch.manual_seed(size)
    layer = randomise_biases(StyledConv(in_ch, out_ch, 3, DIM, upsample=True)).eval().requires_grad_(False)
    layer.conv.fused = False  # the training form: shared_weight_conv, then demodulation
    x, w = torch.randn(2, in_ch, size, size), torch.randn(2, DIM)
    ref = copy.deepcopy(layer).double()(x.double(), w.double(), None)
    polyphase, run_polyphase = prepared_styled_conv(layer, torch.float32, "polyphase")
    assert polyphase.conv.weight_polyphase.shape == (4 * out_ch, in_ch, 3, 3)
    for prepared in (run_polyphase, prepared_styled_conv(layer, torch.float32, "transposed")[1]):
        torch.testing.assert_close(prepared(x, w).double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(layer(x, w, None).double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    half = prepared_styled_conv(layer, torch.float16, "polyphase")[1](x.half(), w)
    transposed = prepared_styled_conv(layer, torch.float16, "transposed")[1](x.half(), w)
    assert half.shape == transposed.shape == (2, out_ch, 2 * size, 2 * size)
    assert_error_within_twice(half.double(), transposed.double(), ref)


def test_resampling_forms_auto_keep_the_training_form_off_cuda_and_unknown_forms_are_refused(stylizer):
    model = prepare_stylizer(stylizer, torch.float32, "auto")
    upsampling = model.synthesis.blocks[0][0].conv
    assert upsampling.upsample_form in ("auto", "transposed")
    assert _form_for("upsample", upsampling.upsample_form, torch.empty(1, 1, 8, 8), 1) == "transposed"
    downsampling = model.encoder[1].conv2[0]
    assert downsampling.form in ("auto", "blurred")
    assert _form_for("downsample", downsampling.form, torch.empty(1, 1, 8, 8), 1) == "blurred"
    with pytest.raises(ValueError, match="upsample_form must be"):
        prepare_stylizer(stylizer, torch.float32, "auto", upsample_form="pixelshuffle")
    with pytest.raises(ValueError, match="downsample_form must be"):
        prepare_stylizer(stylizer, torch.float32, "auto", downsample_form="strided")


@torch.no_grad()
@pytest.mark.parametrize("in_ch,out_ch,size", [(4, 4, 64), (4, 8, 32), (8, 16, 16)])
def test_folded_downsampling_layer_equals_the_training_form(in_ch, out_ch, size):
    """A downsampling ConvLayer with its blur folded into the strided kernel against the training
    layer (blur, then the strided convolution): to fp32 rounding in fp32; in fp16 within twice the
    error of the blurred form in fp16 (both against the layer in fp64)."""
    torch.manual_seed(size)
    layer = randomise_biases(ConvLayer(in_ch, out_ch, 3, downsample=True)).requires_grad_(False)
    x = torch.randn(2, in_ch, size, size)
    ref = copy.deepcopy(layer).double()(x.double())
    for conv_adds_bias in (True, False):
        folded = _conv_layer(layer, torch.float32, conv_adds_bias, downsample_form="folded")
        assert folded[0].weight_folded.shape == (out_ch, in_ch, 6, 6)
        torch.testing.assert_close(folded(x).double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    half = _conv_layer(layer, torch.float16, False, downsample_form="folded")(x.half())
    blurred = _conv_layer(layer, torch.float16, False, downsample_form="blurred")(x.half())
    assert half.shape == blurred.shape == (2, out_ch, size // 2, size // 2)
    assert_error_within_twice(half.double(), blurred.double(), ref)


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_cpu_engine_keeps_freed_memory_for_reuse(stylizer):
    """A 64 MiB block (one 512² activation) comes from the heap, not from fresh mmap'd pages,
    and stays there once freed, for the next call."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = Mallinfo2
    Engine(stylizer, device="cpu")  # retain_cpu_memory=True
    mapped = mallinfo2().hblkhd
    block = torch.ones(64 << 20, dtype=torch.uint8)
    assert mallinfo2().hblkhd - mapped < 64 << 20
    del block
    assert mallinfo2().fordblks >= 64 << 20


def test_warmup_runs_each_bucket_and_memory_stats(stylizer, monkeypatch):
    engine = Engine(stylizer, device="cpu", buckets=(1, 2))
    runs, run = [], engine._run
    monkeypatch.setattr(engine, "_run", lambda name, fn, *inputs: runs.append((name, len(inputs[0]))) or run(
        name, fn, *inputs))
    engine.warmup()
    assert runs == [("stylize", 1), ("stylize", 2)]
    x, w_plus = faces(2), torch.randn(2, 10, DIM)
    with torch.no_grad():
        assert_images_close(engine.stylize(x, w_plus), stylizer(x, w_plus=w_plus, noise="zero"))
    stats = engine.memory_stats()
    assert stats["mode"] == "eager" and stats["buckets"] == (1, 2) and stats["graphs"] == []
    assert stats["text_cache"]["capacity"] == 256


# -- GPU -------------------------------------------------------------------------------------

def _gpu_stylizer():
    return make_stylizer(style_dim=512).cuda()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@torch.no_grad()
def test_gpu_low_precision_error_within_twice_the_plain_cast(precision, channels_last):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    stylizer = _gpu_stylizer()
    x, w_plus = faces(8).cuda(), torch.randn(8, 10, 512, device="cuda")
    ref = stylizer(x, w_plus=w_plus, noise="zero")
    plain = make_stylizer(style_dim=512).cuda().to(dtype)(x.to(dtype), w_plus=w_plus.to(dtype), noise="zero")
    out = Engine(stylizer, precision=precision, channels_last=channels_last).stylize(x, w_plus)
    assert torch.isfinite(out).all()
    assert_error_within_twice(out, plain, ref)


@pytest.mark.gpu
@needs_cuda
@torch.no_grad()
def test_gpu_fp16_never_overflows_over_many_random_z():
    stylizer = _gpu_stylizer()
    engine = Engine(stylizer, precision="fp16")
    x = faces(32).cuda()
    for _ in range(10_000 // 32 + 1):
        w_plus = stylizer.style_from_z(torch.randn(32, 512, device="cuda"))
        assert torch.isfinite(engine.stylize(x, w_plus)).all()


@pytest.mark.gpu
@needs_cuda
@torch.no_grad()
def test_gpu_fp16_full_size_never_overflows_over_many_random_z():
    """The 512² model (512 channels, 512² activations) in fp16, 10,000 z in batches of 32 (~25 s on an H200)."""
    torch.manual_seed(0)
    stylizer = randomise_biases(Stylizer().eval()).cuda()
    engine = Engine(stylizer, precision="fp16")
    x = torch.rand(32, 3, 512, 512, generator=torch.Generator().manual_seed(1)).cuda() * 2 - 1
    for _ in range(10_000 // 32 + 1):
        w_plus = stylizer.style_from_z(torch.randn(32, 512, device="cuda"))
        assert torch.isfinite(engine.stylize(x, w_plus)).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@torch.no_grad()
def test_gpu_graph_replay_equals_eager(precision):
    from mmfs_fast.encoders import CLIPEncoder

    stylizer = _gpu_stylizer()
    clip = CLIPEncoder(random_init=True, device="cuda")
    graphs = Engine(stylizer, clip=clip, precision=precision, cuda_graphs=True)
    eager = Engine(stylizer, clip=clip, precision=precision, cuda_graphs=False, buckets=graphs.buckets)
    # the reference runs the style branch in order on one stream: a race between the graph's
    # parallel branches (a table read before it is written) would show as a difference
    eager._executor.side_by_side = lambda branch, main: (branch(), main())
    x, w_plus = faces(3).cuda(), torch.randn(3, 10, 512, device="cuda")
    noises = [torch.randn(3, 1, r, r, device="cuda") for r in stylizer.noise_resolutions]
    want = eager.stylize(x, w_plus)
    for _ in range(3):  # the first call captures, the others replay
        assert_images_close(graphs.stylize(x, w_plus), want, atol=1e-5)
    assert_images_close(graphs.stylize(x, w_plus, noise=noises), eager.stylize(x, w_plus, noise=noises), atol=1e-5)
    assert_images_close(graphs.encode(x).float(), eager.encode(x).float(), atol=1e-5)
    texts = ["a sketch", "a cartoon"]
    torch.testing.assert_close(graphs.style_from_text(texts), eager.style_from_text(texts), rtol=0, atol=1e-5)
    refs = faces(2, seed=3).cuda()
    torch.testing.assert_close(graphs.style_from_image(refs), eager.style_from_image(refs), rtol=0, atol=1e-5)
    for _ in range(2):
        assert_images_close(graphs.stylize_seed(x, [1, 2, 3]), eager.stylize_seed(x, [1, 2, 3]), atol=1e-5)
        assert_images_close(graphs.stylize_text(x[:2], texts), eager.stylize_text(x[:2], texts), atol=1e-5)
        assert_images_close(graphs.stylize_image(x[:2], refs), eager.stylize_image(x[:2], refs), atol=1e-5)
    stats = graphs.memory_stats()
    assert not stats["eager_fallbacks"]
    assert {name for name, _ in stats["graphs"]} == {"stylize", "encode", "text_style", "image_style",
                                                     "seed_stylize", "text_stylize", "image_stylize"}
    assert 0 < stats["graph_static_bytes"] <= stats["cuda_allocated_bytes"]
