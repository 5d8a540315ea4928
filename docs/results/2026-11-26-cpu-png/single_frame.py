import io, time, numpy as np, av
from PIL import Image
from segmentation_client.wire import cutout_rgba
from tests.conftest import product_frame
h, w = 1080, 1920
frame = product_frame(w, h, seed=3)
yy, xx = np.ogrid[0:h, 0:w]
r = ((xx - w/2) / (w/4)) ** 2 + ((yy - h/2) / (h/3)) ** 2
alpha = np.clip((1.2 - r) * 600, 0, 255).astype(np.uint8)
rgba = cutout_rgba(frame, alpha)
def t(fn, n=5):
    fn(); s = time.perf_counter()
    for _ in range(n): out = fn()
    return round((time.perf_counter() - s) / n * 1000, 1), len(out)
def pil(level):
    def f():
        b = io.BytesIO(); Image.fromarray(rgba).save(b, format="PNG", compress_level=level); return b.getvalue()
    return f
print("pillow l1", t(pil(1)), "l3", t(pil(3)))
for pred in ("none", "sub", "up", "paeth", "mixed"):
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = w, h, "rgba"
    ctx.options = {"pred": pred, "compression_level": "1"}
    ctx.open()
    vf = av.VideoFrame.from_ndarray(rgba, format="rgba")
    def f():
        pk = ctx.encode(vf); return b"".join(bytes(p) for p in pk)
    print("ffmpeg png pred", pred, t(f))
