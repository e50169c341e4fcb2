"""Score networks that predict the noise eps and return the score s = -eps / sigma_t (DESIGN.md).

- :class:`ConvScoreNet`: a 1-D convolutional network for sequence data (DNA one-hot and the like), shape
  (B, C, L). It is length-agnostic (every layer is a same-padded convolution) and takes an optional
  ``extra_emb`` that is added to its time embedding: that is where CTRL's zero-initialised
  :class:`ctrl_bio.model.LabelEmbedding` enters (:class:`ctrl_bio.model.EmbeddingAugmentedScore`), the same
  place classifier-free guidance puts its class embedding (Ho & Salimans 2022).
- :class:`SequencePathway`: CTRL's zero-initialised label pathway for sequence data, a small 1-D CNN of
  (x_t, eps_pre, x0_hat) with t and the labels in its embedding (for :class:`ctrl_bio.model.AugmentedScore`).
- :class:`VectorScoreNet`: an MLP for vector data, shape (B, d), the pre-trained model ``ctrl-bio pretrain``
  trains on a vector domain (the gmm testbed's ``pretrained=learned``).

Both predict eps as in Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 12.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ctrl_bio.label_space import LabelSpace, as_label_space
from ctrl_bio.model import fourier_features
from ctrl_bio.reward import mlp_classifier
from ctrl_bio.sde import SDE
from ctrl_bio.utils import append_dims


class ResidualConvBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv1d, twice, with the time embedding added in between (DDPM's ResBlock in 1-D).

    Args:
        hidden: number of channels, kept fixed through the block.
        emb_dim: width of the time embedding.
        kernel_size: odd convolution width.
        dilation: dilation of both convolutions; growing dilations widen the receptive field over long
            sequences without more parameters (WaveNet, van den Oord et al. 2016).
        groups: GroupNorm groups.
        global_context: add a per-channel shift computed from the mean of the block's input features over the
            whole sequence (global context pooling, as in squeeze-and-excitation, Hu et al. 2018, used
            additively). A dilated stack sees the whole sequence in principle but mixes distant positions
            weakly; the pooled path lets every position read what the sequence as a whole has committed to.
            Its projection starts at zero, so an untrained block computes what a local one computes.
        attention: end the block with a pre-norm multi-head self-attention layer over positions (the
            attention of DDPM's U-Net, Ho et al. 2020, used by DNA-Diffusion), residual, its output
            projection zero-initialised for the same reason.
    """

    def __init__(self, hidden: int, emb_dim: int, kernel_size: int = 3, dilation: int = 1, groups: int = 8,
                 global_context: bool = False, attention: bool = False):
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.norm1 = nn.GroupNorm(groups, hidden)
        self.conv1 = nn.Conv1d(hidden, hidden, kernel_size, padding=padding, dilation=dilation)
        self.emb_proj = nn.Linear(emb_dim, hidden)
        self.norm2 = nn.GroupNorm(groups, hidden)
        self.conv2 = nn.Conv1d(hidden, hidden, kernel_size, padding=padding, dilation=dilation)
        self.global_proj = nn.Linear(hidden, hidden) if global_context else None
        if self.global_proj is not None:
            nn.init.zeros_(self.global_proj.weight)
            nn.init.zeros_(self.global_proj.bias)
        self.attn_norm = nn.GroupNorm(groups, hidden) if attention else None
        self.attn = nn.MultiheadAttention(hidden, num_heads=4, batch_first=True) if attention else None
        if self.attn is not None:
            nn.init.zeros_(self.attn.out_proj.weight)
            nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """(B, hidden, L), (B, emb_dim) -> (B, hidden, L)."""
        a = F.silu(self.norm1(h))
        z = self.conv1(a)
        # A per-channel shift, broadcast over positions: the embedding carries t (and the label), not x.
        z = z + self.emb_proj(emb).unsqueeze(-1)
        if self.global_proj is not None:
            z = z + self.global_proj(a.mean(dim=-1)).unsqueeze(-1)
        h = h + self.conv2(F.silu(self.norm2(z)))
        if self.attn is not None:
            q = self.attn_norm(h).transpose(1, 2)
            h = h + self.attn(q, q, q, need_weights=False)[0].transpose(1, 2)
        return h


class ConvScoreNet(nn.Module):
    """An eps-predicting residual 1-D CNN that returns the score; about 0.95M parameters at the defaults.

    Args:
        sde: the SDE the network is trained with (turns the eps prediction into a score).
        channels_in: input channels C (4 for one-hot DNA).
        hidden: channels of the residual stream.
        n_blocks: residual blocks; dilations cycle through 1, 2, 4, 8.
        emb_dim: width of the time embedding (and of any ``extra_emb``).
        kernel_size: odd convolution width.
        n_fourier: Fourier features of t fed to the time MLP.
        groups: GroupNorm groups (must divide ``hidden``).
        label_blocks: how many of the last blocks receive ``extra_emb`` (None: all of them). Fewer blocks
            make CTRL's paired evaluation cheaper (:meth:`forward_pair`) at the price of a label pathway
            that acts on later features only.
        output: ``eps`` predicts the noise directly (Ho et al. 2020). ``categorical`` is for one-hot data in
            {-1, +1}^C: the network outputs per-position logits over the C categories, the exact Gaussian
            likelihood of x_t at that position, 2 alpha_t x_t / sigma_t^2, is added to them, and the
            posterior mean x0_hat = 2 softmax - 1 gives the noise (the score interpolation of CDCD, Dieleman
            et al. 2022, with the one-position likelihood in closed form). The output layer starts at zero, so
            an untrained network is the exact denoiser of independent uniform categories, and training only
            has to learn what context adds; at low noise the likelihood dominates and the denoiser is exact.
        context: ``local`` (dilated convolutions only); ``pool``: every block also adds a shift computed from
            its features averaged over the sequence (:class:`ResidualConvBlock`'s ``global_context``);
            ``attention``: every fourth block ends with self-attention over positions. Both let the denoiser
            at one position depend on what the whole sequence reads as (a regulatory sequence is active in
            one cell type from end to end), and both keep the network length-agnostic.
    """

    def __init__(self, sde: SDE, channels_in: int = 4, hidden: int = 128, n_blocks: int = 8, emb_dim: int = 128,
                 kernel_size: int = 3, n_fourier: int = 32, groups: int = 8, label_blocks: int | None = None,
                 output: str = "eps", context: str = "local"):
        super().__init__()
        if output not in ("eps", "categorical"):
            raise ValueError(f"output must be 'eps' or 'categorical', got {output!r}")
        if context not in ("local", "pool", "attention"):
            raise ValueError(f"context must be 'local', 'pool' or 'attention', got {context!r}")
        if context == "attention" and hidden % 4 != 0:
            raise ValueError(f"context='attention' uses 4 heads, so hidden must be a multiple of 4, got {hidden}")
        self.output = output
        if label_blocks is not None and not 1 <= label_blocks <= n_blocks:
            raise ValueError(f"label_blocks must lie in 1..n_blocks ({n_blocks}) or be None, got {label_blocks}")
        self.label_blocks = label_blocks
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the length, got {kernel_size}")
        if hidden % groups != 0:
            raise ValueError(f"groups ({groups}) must divide hidden ({hidden})")
        self.sde = sde
        #: The constructor arguments besides the SDE: what a checkpoint needs to rebuild the network.
        self.config = {"channels_in": channels_in, "hidden": hidden, "n_blocks": n_blocks, "emb_dim": emb_dim,
                       "kernel_size": kernel_size, "n_fourier": n_fourier, "groups": groups,
                       "label_blocks": label_blocks,
                       # named only when not the default, so every checkpoint written before it reads the same
                       **({"output": output} if output != "eps" else {}),
                       **({"context": context} if context != "local" else {})}
        self.channels_in, self.emb_dim, self.n_fourier = channels_in, emb_dim, n_fourier
        self.time_mlp = nn.Sequential(nn.Linear(n_fourier, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv1d(channels_in, hidden, kernel_size, padding=kernel_size // 2)
        self.blocks = nn.ModuleList(
            ResidualConvBlock(hidden, emb_dim, kernel_size, dilation=2 ** (i % 4), groups=groups,
                              global_context=context == "pool", attention=context == "attention" and i % 4 == 3)
            for i in range(n_blocks))
        self.norm_out = nn.GroupNorm(groups, hidden)
        self.conv_out = nn.Conv1d(hidden, channels_in, kernel_size, padding=kernel_size // 2)
        if output == "categorical":
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def embed_time(self, t: Tensor, extra_emb: Tensor | None = None) -> Tensor:
        """Time embedding plus ``extra_emb``, passed through the SiLU every block's projection expects, (B, emb_dim)."""
        emb = self.time_mlp(fourier_features(t, self.n_fourier))
        if extra_emb is not None:
            # Only added when given: a zero embedding then leaves every bit of the pre-trained output unchanged.
            emb = emb + extra_emb
        return F.silu(emb)

    @property
    def first_label_block(self) -> int:
        """Index of the first block that sees ``extra_emb``; earlier blocks see the plain time embedding."""
        return 0 if self.label_blocks is None else len(self.blocks) - self.label_blocks

    def _trunk(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Blocks before the label enters, shared by the conditional and the pre-trained evaluation."""
        if x.ndim != 3 or x.shape[1] != self.channels_in:
            raise ValueError(f"expected input of shape (batch_size, {self.channels_in}, length), got {tuple(x.shape)}")
        t_vec = (t.expand(x.shape[0]) if t.ndim == 0 else t).to(x.dtype)
        emb = self.embed_time(t_vec)
        h = self.conv_in(x)
        for block in self.blocks[:self.first_label_block]:
            h = block(h, emb)
        return h, t_vec

    def _head_eps(self, h: Tensor, x: Tensor, t_vec: Tensor, extra_emb: Tensor | None) -> Tensor:
        emb = self.embed_time(t_vec, extra_emb)
        for block in self.blocks[self.first_label_block:]:
            h = block(h, emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if self.output == "eps":
            return out
        alpha, sigma = append_dims(self.sde.alpha(t_vec), x.ndim), append_dims(self.sde.sigma(t_vec), x.ndim)
        # log N(x_t; alpha v_c, sigma^2 I) for the one-hot v_c in {-1, +1}^C is 2 alpha x_t[c] / sigma^2 up to
        # terms shared by all c (every v_c has the same norm), so it enters the softmax as a logit.
        x0_hat = 2 * torch.softmax(out + 2 * alpha * x / sigma**2, dim=1) - 1
        return (x - alpha * x0_hat) / sigma

    def predict_eps(self, x: Tensor, t: Tensor, extra_emb: Tensor | None = None) -> Tensor:
        """Noise prediction eps(x_t, t), (B, C, L) -> (B, C, L)."""
        h, t_vec = self._trunk(x, t)
        return self._head_eps(h, x, t_vec, extra_emb)

    def forward(self, x: Tensor, t: Tensor, extra_emb: Tensor | None = None) -> Tensor:
        """Score s(x_t, t) = -eps / sigma_t.

        Args:
            x: noisy inputs x_t, (B, C, L) for any length L.
            t: times, (B,) or a scalar tensor.
            extra_emb: optional (B, emb_dim) added to the time embedding (a label embedding) of the last
                ``label_blocks`` blocks.

        Returns:
            The score, (B, C, L).
        """
        t_vec = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.sde.score_from_eps(self.predict_eps(x, t_vec, extra_emb), t_vec)

    def forward_pair(self, x: Tensor, t: Tensor, extra_emb: Tensor) -> tuple[Tensor, Tensor]:
        """(s with ``extra_emb``, s without it), the blocks before the label computed once for both.

        CTRL's KL needs the pre-trained score at every sampler step; with ``label_blocks`` = k only the
        last k blocks run twice, which is what keeps a fine-tuning step close to the cost of the network.
        """
        h, t_vec = self._trunk(x, t)
        eps, eps_pre = self._head_eps(h, x, t_vec, extra_emb), self._head_eps(h, x, t_vec, None)
        return self.sde.score_from_eps(eps, t_vec), self.sde.score_from_eps(eps_pre, t_vec)


class VectorScoreNet(nn.Module):
    """An eps-predicting MLP score network for vector data (B, d): the pre-trained model of a vector domain.

    The network sees x_t and Fourier features of t and predicts the noise eps (Ho et al. 2020, eq. 12);
    it returns the score s = -eps / sigma_t through the SDE (DESIGN.md).

    Args:
        sde: the SDE the network is trained with.
        dim: data dimension d.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        n_fourier: Fourier features of t.
    """

    def __init__(self, sde: SDE, dim: int, hidden: int = 256, depth: int = 3, n_fourier: int = 16):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden and depth must be positive, got {dim}, {hidden}, {depth}")
        self.sde = sde
        #: The constructor arguments besides the SDE: what a checkpoint needs to rebuild the network.
        self.config = {"dim": dim, "hidden": hidden, "depth": depth, "n_fourier": n_fourier}
        self.n_fourier = n_fourier
        # The core's plain MLP (Linear-SiLU x depth, then Linear), here with d outputs for eps.
        self.mlp = mlp_classifier(dim + n_fourier, dim, hidden=hidden, depth=depth)

    def predict_eps(self, x: Tensor, t: Tensor) -> Tensor:
        """Noise prediction eps(x_t, t), (B, d) -> (B, d)."""
        t_vec = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.mlp(torch.cat([x, fourier_features(t_vec.to(x.dtype), self.n_fourier)], dim=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Score s(x_t, t) = -eps / sigma_t, (B, d); t of shape (B,) or a scalar tensor."""
        t_vec = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.sde.score_from_eps(self.predict_eps(x, t_vec), t_vec)


class SequencePathway(nn.Module):
    """CTRL's label pathway u(x_t, t, y) for sequence data (B, C, L): a small residual 1-D CNN, zero last layer.

    The frozen network's embedding-only pathway (:class:`ctrl_bio.model.EmbeddingAugmentedScore`) can only shift
    the biases of its last blocks per class; this one sees the sequence itself. Like
    :class:`ctrl_bio.model.VectorPathway` it reads x_t, the pre-trained noise prediction eps_pre = -sigma_t s_pre
    and the denoised x0_hat (both free: s_pre is computed anyway), with t and the labels in its embedding, and
    predicts in noise units, u = -net / sigma_t. The output convolution starts at zero, so step 0 of fine-tuning
    is the pre-trained sampler bit for bit (use it through :class:`ctrl_bio.model.AugmentedScore`).

    Args:
        channels: channels C of the data (4 for one-hot DNA).
        n_classes: classes of each label, or a label space (:mod:`ctrl_bio.label_space`; real values, NaN for none).
        hidden: channels of the residual stream.
        n_blocks: residual blocks (dilations 1, 2, 4, 8, ...).
        emb_dim: width of the time + label embedding.
        kernel_size: odd convolution width.
        n_fourier: Fourier features of t.
    """

    def __init__(self, channels: int, n_classes: Sequence[int] | LabelSpace, hidden: int = 64, n_blocks: int = 4,
                 emb_dim: int = 64, kernel_size: int = 5, n_fourier: int = 32):
        super().__init__()
        self.labels = as_label_space(n_classes)
        self.n_fourier = n_fourier
        self.time_mlp = nn.Sequential(nn.Linear(n_fourier, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Linear(self.labels.n_features, emb_dim, bias=False)
        self.conv_in = nn.Conv1d(3 * channels, hidden, kernel_size, padding=kernel_size // 2)
        self.blocks = nn.ModuleList(ResidualConvBlock(hidden, emb_dim, kernel_size, dilation=2 ** (i % 4))
                                    for i in range(n_blocks))
        self.norm_out = nn.GroupNorm(8, hidden)
        self.conv_out = nn.Conv1d(hidden, channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, s_pre: Tensor, sde: SDE) -> Tensor:
        t_vec = t.expand(x.shape[0]) if t.ndim == 0 else t
        alpha, sigma = append_dims(sde.alpha(t_vec), x.ndim), append_dims(sde.sigma(t_vec), x.ndim)
        eps_pre = -sigma * s_pre
        x0_hat = (x - sigma * eps_pre) / alpha
        emb = F.silu(self.time_mlp(fourier_features(t_vec.to(x.dtype), self.n_fourier))
                     + self.label_emb(self.labels.features(y)))
        h = self.conv_in(torch.cat([x, eps_pre, x0_hat], dim=1))
        for block in self.blocks:
            h = block(h, emb)
        eps_u = self.conv_out(F.silu(self.norm_out(h)))
        active = append_dims(self.labels.requested(y).any(dim=1).to(x.dtype), x.ndim)  # none asked: no control
        return -active * eps_u / sigma

    @property
    def n_classes(self) -> tuple[int, ...]:
        """Classes per label (categorical labels only)."""
        return self.labels.n_classes
