# A small BiRefNet-format model trained on synthetic product shots (segmentation_standins.train).
#
# Unlike tiny_birefnet (random weights, a single-scale toy), this is a small U-Net whose
# bottleneck is shifted-window attention, so it learns real mattes in minutes. It keeps the
# interface and the two hazards of the published RMBG-2.0 birefnet.py:
#   1. __init__ replaces self.config with a plain object and calls .item() on a tensor, so it
#      cannot be built on the meta device (transformers 5 from_pretrained fails on it);
#   2. the window attention adds a mask built in FP32 inside forward, so plain .half() fails
#      at `attn @ v` with a dtype mismatch.
# In eval mode forward returns a list of 4 maps (1/8, 1/4, 1/2 and full resolution), the last
# full-resolution logits [B, 1, H, W]. Inputs must be a multiple of 64 pixels square.
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel

from .BiRefNet_config import BiRefNetConfig


class Config:
    def __init__(self):
        self.dims = (16, 32, 64, 128)
        self.window_size = 4
        self.depth = 2
        self.drop_path_rate = 0.1


def window_partition(x, window_size):
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size * window_size, c)


def window_reverse(windows, window_size, h, w):
    b = int(windows.shape[0] / (h * w / window_size / window_size))
    x = windows.view(b, h // window_size, w // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


class WindowAttention(nn.Module):
    def __init__(self, dim, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.scale = (dim // heads) ** -0.5

    def forward(self, x, mask=None):
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class Block(nn.Module):
    def __init__(self, dim, window_size, shift):
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x):
        b, c, h, w = x.shape
        ws = self.window_size
        tokens = self.norm(x.permute(0, 2, 3, 1))
        if self.shift:
            tokens = torch.roll(tokens, shifts=(-ws // 2, -ws // 2), dims=(1, 2))
        # Built in FP32 on purpose, as the published Swin code does.
        img_mask = torch.zeros((1, h, w, 1), device=x.device)
        img_mask[:, h - ws // 2 :, :, :] = 1
        img_mask[:, :, w - ws // 2 :, :] += 2
        mask_windows = window_partition(img_mask, ws).squeeze(-1)
        attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(
            attn_mask == 0, float(0.0)
        )
        windows = window_partition(tokens, ws)
        out = window_reverse(self.attn(windows, mask=attn_mask if self.shift else None), ws, h, w)
        if self.shift:
            out = torch.roll(out, shifts=(ws // 2, ws // 2), dims=(1, 2))
        x = x.permute(0, 2, 3, 1) + out
        x = x + self.mlp(self.norm2(x))
        return x.permute(0, 3, 1, 2)


def conv_bn(cin, cout, stride=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Down(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(conv_bn(cin, cout, stride=2), conv_bn(cout, cout))


class Up(nn.Module):
    def __init__(self, cin, cskip, cout):
        super().__init__()
        self.fuse = nn.Sequential(conv_bn(cin + cskip, cout), conv_bn(cout, cout))
        self.head = nn.Conv2d(cout, 1, kernel_size=1)

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([x, skip], dim=1))
        return x, self.head(x)


class BiRefNet(PreTrainedModel):
    config_class = BiRefNetConfig

    def __init__(self, bb_pretrained=True, config=BiRefNetConfig()):
        super().__init__(config)
        self.config = Config()
        d1, d2, d3, d4 = self.config.dims
        self.drop_rates = [
            x.item() for x in torch.linspace(0, self.config.drop_path_rate, self.config.depth)
        ]
        self.enc1 = Down(3, d1)
        self.enc2 = Down(d1, d2)
        self.enc3 = Down(d2, d3)
        self.enc4 = Down(d3, d4)
        self.blocks = nn.ModuleList(
            Block(d4, self.config.window_size, shift=bool(i % 2)) for i in range(self.config.depth)
        )
        self.up3 = Up(d4, d3, d3)
        self.up2 = Up(d3, d2, d2)
        self.up1 = Up(d2, d1, d1)
        self.refine = nn.Sequential(conv_bn(d1 + 3, d1), nn.Conv2d(d1, 1, kernel_size=3, padding=1))

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        feats = self.enc4(e3)
        for block in self.blocks:
            feats = block(feats)
        d3, m3 = self.up3(feats, e3)
        d2, m2 = self.up2(d3, e2)
        d1, m1 = self.up1(d2, e1)
        full = F.interpolate(d1, size=x.shape[2:], mode="bilinear", align_corners=False)
        coarse = F.interpolate(m1, size=x.shape[2:], mode="bilinear", align_corners=False)
        return [m3, m2, m1, self.refine(torch.cat([full, x], dim=1)) + coarse]
