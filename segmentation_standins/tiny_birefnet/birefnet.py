# A tiny model in the RMBG-2.0 (BiRefNet) remote-code format, for tests and the CPU demo.
#
# It keeps the interface and the two hazards of the published birefnet.py:
#   1. __init__ replaces self.config with a plain object and calls .item() on a tensor, so it
#      cannot be built on the meta device (transformers 5 from_pretrained fails on it);
#   2. the window attention adds a mask built in FP32 inside forward, so plain .half() fails
#      at `attn @ v` with a dtype mismatch.
# In eval mode forward returns a list of 4 maps, the last full-resolution logits [B, 1, H, W].
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel

from .BiRefNet_config import BiRefNetConfig


class Config:
    def __init__(self):
        self.dim = 16
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
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.scale = dim**-0.5

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, x.shape[1], x.shape[1]) + mask.unsqueeze(0)
            attn = attn.view(-1, x.shape[1], x.shape[1])
        attn = attn.softmax(dim=-1)
        return self.proj(attn @ v)


class Block(nn.Module):
    def __init__(self, dim, window_size, shift):
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim)

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
        return x + out.permute(0, 3, 1, 2)


class BiRefNet(PreTrainedModel):
    config_class = BiRefNetConfig

    def __init__(self, bb_pretrained=True, config=BiRefNetConfig()):
        super().__init__(config)
        self.config = Config()
        dim = self.config.dim
        self.drop_rates = [x.item() for x in torch.linspace(0, self.config.drop_path_rate, self.config.depth)]
        self.stem = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.blocks = nn.ModuleList(
            Block(dim, self.config.window_size, shift=bool(i % 2)) for i in range(self.config.depth)
        )
        self.heads = nn.ModuleList(nn.Conv2d(dim, 1, kernel_size=1) for _ in range(3))
        self.refine = nn.Conv2d(3 + 1, 1, kernel_size=3, padding=1)

    def forward(self, x):
        feats = self.stem(x)
        for block in self.blocks:
            feats = block(feats)
        maps = [head(F.avg_pool2d(feats, 2 ** (2 - i))) for i, head in enumerate(self.heads)]
        coarse = F.interpolate(maps[-1], size=x.shape[2:], mode="bilinear", align_corners=False)
        maps.append(self.refine(torch.cat([x, coarse], dim=1)) + coarse)
        return maps
