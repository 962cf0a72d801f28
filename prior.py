"""
A prior over a trained tokenizer's codes: a small causal transformer (a GPT) that generates and completes them.

Papers: "PQ-VAE: Learning Hierarchical Discrete Representations with Progressive Quantization", Huang, Qiu and
Sapiro, section 5.3 (a transformer over the ordered codes with "a position-specific linear transformation") and
Table 3 (the first l codes from the posterior, the rest from the prior); GPT-2, "Language Models are Unsupervised
Multitask Learners", as nanoGPT writes it. The hierarchy paper (arXiv:2601.22244) asks which codes suit a prior.

The idea. A tokenizer (a model with code_layout(): vqvae, vqvae2, pqvae, ...) turns an image into codes, read as one
sequence z_1..z_n (the model protocol in README.md: levels in order, raster order, groups last). The prior models
p(z) = prod_t p(z_t | z_<t): the input at t is a start token or z_(t-1)'s embedding, plus a position embedding; the
output is the logits of z_t over its level's K codes; the loss is the cross-entropy, logged in bits. In pqvae a code
means a different vector at every step, so each embedding first goes through its position's own matrix (PQ-VAE's
position-specific transformation; on by default for 1-D codes). The tokenizer is frozen (eval mode, float32 in any
autocast) and encodes each batch as it comes, so train.py serves the prior unchanged; its weights travel in the
prior's checkpoint.

Where this departs from the papers: the position matrices start at the identity (PQ-VAE gives no initialisation).

Train it:  python train.py --model prior --tokenizer out/pqvae_mnist/ckpt.pt   (dataset and image size from the
           tokenizer's checkpoint; out_dir out/prior_pqvae_mnist)
Evaluate:  python eval.py --ckpt out/prior_pqvae_mnist/ckpt.pt --split test   (bits per image and code, baselines)
Sample:    python sample.py --ckpt out/prior_pqvae_mnist/ckpt.pt --num 64
"""

import dataclasses
import importlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as evaluation


@dataclass
class Config:
    tokenizer: str = ""  # a train.py checkpoint of a model with code_layout()
    # from the tokenizer's checkpoint (inherited_settings, or Model)
    tokenizer_model: str = ""  # its model file, e.g. "pqvae"
    tokenizer_config: dict = dataclasses.field(default_factory=dict)  # its Config
    tokenizer_layout: list = dataclasses.field(default_factory=list)  # its code_layout(): [(shape, K), ...]
    image_size: int = 32
    in_channels: int = 3
    # the transformer: nanoGPT's, small (ours: a CPU budget)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    position_linear: bool | None = None  # PQ-VAE's matrix per position; None: on for 1-D codes


# Every dataset: nanoGPT's small-model learning rate (train.py's 3e-4 suits the tokenizers), a short warm-up
PRESETS = {name: dict(lr=1e-3, warmup_iters=100) for name in data.DATASETS}


# The transformer (nanoGPT's blocks)

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.n_head < 1 or cfg.n_embd < 1 or cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} must be a positive multiple of n_head {cfg.n_head}")
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, E = x.shape
        q, k, v = (t.view(B, T, self.n_head, E // self.n_head).transpose(1, 2) for t in self.qkv(x).split(E, 2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)  # (B, heads, T, E / heads): position t sees 1..t
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, E)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# Model

class Model(nn.Module):
    """The frozen tokenizer -> code sequence (B, n) -> causal transformer -> logits (B, n, V), V the largest K.

    The tokenizer's weights come from the file cfg.tokenizer if it holds the same config; a prior's checkpoint
    brings its own copy (load_state_dict), so a tokenizer file changed or gone since does not matter."""

    def __init__(self, cfg):
        super().__init__()
        if not cfg.tokenizer_model:
            cfg = dataclasses.replace(cfg, **tokenizer_settings(cfg.tokenizer)[0])
        self.cfg = cfg
        module = importlib.import_module(cfg.tokenizer_model)
        self.tokenizer = evaluation.build_model(module, cfg.tokenizer_config, f"the tokenizer of {cfg.tokenizer}",
                                                tokenizer_weights(cfg.tokenizer, cfg.tokenizer_config))
        self.tokenizer.requires_grad_(False).eval()
        self.layout = cfg.tokenizer_layout  # [(one image's code shape, K), ...]

        sizes = [K for shape, K in self.layout for _ in range(math.prod(shape))]
        self.n, self.vocab = len(sizes), max(sizes)  # sequence length n, V
        # the number of codes at each position (eval.py's baselines), and the logits each position cannot take
        self.register_buffer("code_sizes", torch.tensor(sizes), persistent=False)
        self.register_buffer("invalid", torch.arange(self.vocab)[None, :] >= self.code_sizes[:, None],
                             persistent=False)  # (n, V)
        E = cfg.n_embd
        self.wte = nn.Embedding(self.vocab + 1, E)  # the V codes, and the start token V
        self.wpe = nn.Parameter(torch.randn(self.n, E) * 0.02)
        one_d = len(self.layout) == 1 and len(self.layout[0][0]) == 1  # pqvae's ordered steps
        on = one_d if cfg.position_linear is None else cfg.position_linear
        # (n, E, E), each the identity at first: the plain shared embedding
        self.position_linear = nn.Parameter(torch.eye(E).repeat(self.n, 1, 1)) if on else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(E)
        self.head = nn.Linear(E, self.vocab, bias=False)
        for name, p in self.named_parameters():  # GPT-2's initialisation; the tokenizer is left as loaded
            if name.startswith(("tokenizer.", "wpe", "position_linear")) or "ln_" in name:
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            else:  # the projections into the residual stream scaled down by depth (GPT-2)
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def train(self, mode=True):
        super().train(mode)
        self.tokenizer.eval()  # frozen: its codebooks never update, whatever train.py asks
        return self

    def logits(self, codes):
        """codes (B, t), the first t <= n codes of each sequence -> (B, min(t + 1, n), V): at position p, the logits
        of code p given codes 0..p-1 (-inf beyond the K of p's level)."""
        B, t = codes.shape
        tok = self.wte(codes)  # (B, t, E)
        if self.position_linear is not None:  # code p's embedding through position p's own matrix
            tok = torch.einsum("bte,tef->btf", tok, self.position_linear[:t])
        start = self.wte.weight[self.vocab].expand(B, 1, -1)
        x = torch.cat([start, tok], 1)[:, :self.n]  # (B, T, E): input p holds code p-1
        x = self.drop(x + self.wpe[:x.shape[1]])
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))  # (B, T, V)
        return logits.masked_fill(self.invalid[:x.shape[1]], float("-inf"))

    def forward(self, x):
        return None, *self.loss(self.encode(x))  # nothing to reconstruct: x_hat None

    def loss(self, codes):
        """codes (B, n) -> (the mean cross-entropy of each code given those before it, in nats; stats in bits)."""
        loss = F.cross_entropy(self.logits(codes).float().flatten(0, 1), codes.flatten())
        bits = loss.detach() / math.log(2)
        return loss, {"bits_per_code": bits, "bits_per_image": bits * self.n}

    @torch.no_grad()
    def encode(self, x):
        """(B, C, H, W) -> the tokenizer's codes as one sequence (B, n), computed in float32."""
        with torch.autocast(x.device.type, enabled=False):
            return evaluation.code_sequence(self.tokenizer.encode(x.float()))

    @torch.no_grad()
    def decode(self, codes):
        """(B, n) -> the tokenizer's decoding (B, C, H, W)."""
        with torch.autocast(codes.device.type, enabled=False):
            return self.tokenizer.decode(evaluation.sequence_to_codes(codes, self.layout))

    @torch.no_grad()
    def generate(self, codes, temperature=1.0, top_k=0, generator=None):
        """codes (B, m), the first m codes of each sequence (m may be 0) -> (B, n): the rest drawn one at a time from
        softmax(logits / temperature) over the top_k likeliest codes (0: all of them; temperature 0: the likeliest)."""
        while codes.shape[1] < self.n:
            logits = self.logits(codes)[:, -1].float()  # (B, V)
            if temperature == 0:
                following = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = logits.topk(min(top_k, self.vocab), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                following = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            codes = torch.cat([codes, following], 1)
        return codes


# Loading the tokenizer from its checkpoint

def load_tokenizer(path):
    """A tokenizer's train.py checkpoint -> (its Model in eval mode, the checkpoint), or an exit naming the file."""
    if not path or not os.path.isfile(path):
        raise SystemExit(f"prior.py: no tokenizer checkpoint at {path!r} (--tokenizer: a train.py checkpoint)")
    ckpt = evaluation.read_checkpoint(path, "prior.py")
    name = ckpt["train_config"]["model"]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError:
        raise SystemExit(f"prior.py: {path} holds a {name} model, and there is no {name}.py") from None
    if not hasattr(module.Model, "code_layout"):
        raise SystemExit(f"prior.py: {path} holds a {name} model, which has no code_layout(); a tokenizer is one of "
                         f"vqvae, mgvq, vqvae2, pqvae, warmup_vqgan")
    return evaluation.build_model(module, ckpt["model_config"], path, ckpt["model"]).eval(), ckpt


def tokenizer_settings(path):
    """The prior's Config fields that come from its tokenizer's checkpoint, and that checkpoint."""
    model, ckpt = load_tokenizer(path)
    try:
        layout = [(tuple(shape), K) for shape, K in model.code_layout()]
    except ValueError as err:  # a model with no codes to give yet
        raise SystemExit(f"prior.py: {path}: {err}") from None
    mcfg = ckpt["model_config"]
    return {"tokenizer_model": ckpt["train_config"]["model"], "tokenizer_config": dict(mcfg),
            "tokenizer_layout": layout, "image_size": mcfg["image_size"], "in_channels": mcfg["in_channels"]}, ckpt


def tokenizer_weights(path, config):
    """The weights in the checkpoint at `path` if it holds a model of this exact config, else None."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing, unreadable or foreign
        return None
    same = isinstance(ckpt, dict) and ckpt.get("model_config") == config and "model" in ckpt
    return ckpt["model"] if same else None


def inherited_settings(args):
    """train.py's hook, given the command line {key: raw value}: the tokenizer's settings, dataset, data_dir and
    image shape, and out_dir out/prior_<its run folder>. Another --dataset, --image_size or --in_channels is refused
    (the prior models codes of that data); --data_dir may point elsewhere."""
    path = args.get("tokenizer")
    settings, ckpt = tokenizer_settings(path)
    for key in ("tokenizer_model", "tokenizer_config", "tokenizer_layout"):
        if key in args:
            raise SystemExit(f"prior.py: --{key} comes from the tokenizer's checkpoint; it cannot be set")
    settings.update(dataset=ckpt["train_config"]["dataset"], data_dir=ckpt["train_config"]["data_dir"])
    for key in ("dataset", "image_size", "in_channels"):
        if args.get(key) is not None and str(args[key]) != str(settings[key]):
            raise SystemExit(f"prior.py: --{key} {args[key]} differs from the tokenizer's {settings[key]} ({path})")
    run = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return {**settings, "out_dir": os.path.join("out", f"prior_{run}")}
