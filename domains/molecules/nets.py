"""Permutation-equivariant networks on dense molecular graphs, built on PyTorch Geometric's dense layers.

- :class:`GraphScoreNet`: the eps-predicting score network of the continuous graph diffusion (nodes and
  bonds diffused jointly, as in GDSS, Jo et al. 2022, "Score-based Generative Modeling of Graphs via the
  System of Stochastic Differential Equations"), returning s = -eps / sigma_t. It takes an ``extra_emb``
  added to its time embedding: CTRL's zero-initialised :class:`ctrl_bio.model.LabelEmbedding` enters there
  (:class:`ctrl_bio.model.EmbeddingAugmentedScore`), as does classifier-free guidance's class embedding.
- :class:`GraphClassifier`: logits (or a regression output) of clean or noisy graphs; the reward classifiers,
  the noise-conditional classifier of classifier guidance and the evaluation oracle are all this network.

Both read the flat x (B, 189) of :mod:`domains.molecules.data` as node states (B, 9, d) and symmetric edge
states (B, 9, 9, d_e). A layer passes messages with :class:`torch_geometric.nn.DenseGraphConv` over
``n_adjacency`` soft adjacency matrices read off the edge states (so that bond orders weigh messages
differently), then updates every edge from its two end nodes with terms symmetric in them. Nothing depends on
the order of the nodes: permuting them permutes the output the same way (a test checks it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ctrl_bio.model import fourier_features
from ctrl_bio.sde import SDE
from domains.molecules.data import COLS, MAX_ATOMS, N_EDGE_TYPES, N_NODE_TYPES, ROWS, X_DIM, join_x, split_x


def _dense_graph_conv(hidden: int) -> nn.Module:
    from torch_geometric.nn import DenseGraphConv

    return DenseGraphConv(hidden, hidden, aggr="add")


def edges_to_matrix(edges: Tensor) -> Tensor:
    """Upper-triangle edge channels (B, 36, C) as a symmetric matrix (B, 9, 9, C) with a zero diagonal."""
    b, _, c = edges.shape
    out = edges.new_zeros(b, MAX_ATOMS, MAX_ATOMS, c)
    out[:, ROWS, COLS] = edges
    out[:, COLS, ROWS] = edges
    return out


class GraphLayer(nn.Module):
    """One message-passing layer: nodes from neighbours (DenseGraphConv per adjacency channel), edges from nodes.

    Args:
        hidden: node state width.
        edge_hidden: edge state width.
        emb_dim: conditioning embedding width (time, and a label where one is added).
        n_adjacency: soft adjacency matrices (one DenseGraphConv each).
    """

    def __init__(self, hidden: int, edge_hidden: int, emb_dim: int, n_adjacency: int = 4):
        super().__init__()
        self.adjacency = nn.Linear(edge_hidden, n_adjacency)
        self.convs = nn.ModuleList(_dense_graph_conv(hidden) for _ in range(n_adjacency))
        self.node_norm = nn.LayerNorm(hidden)
        self.node_emb = nn.Linear(emb_dim, 2 * hidden)
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.edge_norm = nn.LayerNorm(edge_hidden)
        self.edge_emb = nn.Linear(emb_dim, edge_hidden)
        self.node_to_edge = nn.Linear(hidden, edge_hidden)
        self.edge_mlp = nn.Sequential(nn.Linear(3 * edge_hidden, edge_hidden), nn.SiLU(),
                                      nn.Linear(edge_hidden, edge_hidden))

    def forward(self, h: Tensor, e: Tensor, emb: Tensor, off_diagonal: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, N, d), e (B, N, N, d_e), emb (B, emb_dim), off_diagonal (N, N) -> updated (h, e)."""
        adj = torch.sigmoid(self.adjacency(e)) * off_diagonal.unsqueeze(-1)
        z = self.node_norm(h)
        msg = sum(conv(z, adj[..., k]) for k, conv in enumerate(self.convs)) / len(self.convs)
        # The graph mean lets every node see the molecule's size and composition in one layer.
        scale, shift = self.node_emb(emb).unsqueeze(1).chunk(2, dim=-1)
        u = torch.cat([msg, z.mean(dim=1, keepdim=True).expand_as(z)], dim=-1)
        h = h + self.node_mlp(u) * (1 + scale) + shift
        p = self.node_to_edge(h)
        hi, hj = p.unsqueeze(2), p.unsqueeze(1)
        # h_i + h_j and h_i * h_j are symmetric in (i, j), so e stays symmetric.
        pair = torch.cat([self.edge_norm(e), (hi + hj).expand(-1, -1, MAX_ATOMS, -1),
                          (hi * hj)], dim=-1)
        e = e + (self.edge_mlp(pair) + self.edge_emb(emb)[:, None, None, :]) * off_diagonal.unsqueeze(-1)
        return h, e


def valence_features(edges: Tensor) -> Tensor:
    """Per node, the expected bond-order sum and degree under a softmax of the noisy bond channels, (B, 36, 4) ->
    (B, 9, 2).

    Valence is what an invalid molecule breaks, and it is a sum over a node's bonds that message passing would have to
    learn to count; given as an input (as DiGress, Vignac et al. 2023, adds valency features), every layer sees it.
    """
    p = torch.softmax(2.0 * edges, dim=-1)  # one-hot in {-1, +1}: clean bonds give p ~ 0.98 on their channel
    order = (p * torch.arange(N_EDGE_TYPES, dtype=p.dtype, device=p.device)).sum(-1, keepdim=True)
    bonded = 1.0 - p[..., :1]
    return edges_to_matrix(torch.cat([order, bonded], dim=-1)).sum(dim=2)


class GraphTrunk(nn.Module):
    """x (B, 189) and an embedding (B, emb_dim) -> node states (B, 9, hidden), edge states (B, 9, 9, edge_hidden)."""

    def __init__(self, hidden: int, edge_hidden: int, emb_dim: int, n_layers: int, n_adjacency: int):
        super().__init__()
        self.node_in = nn.Linear(N_NODE_TYPES + 2, hidden)
        self.edge_in = nn.Linear(N_EDGE_TYPES, edge_hidden)
        self.layers = nn.ModuleList(GraphLayer(hidden, edge_hidden, emb_dim, n_adjacency) for _ in range(n_layers))
        self.register_buffer("off_diagonal", 1.0 - torch.eye(MAX_ATOMS), persistent=False)

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 2 or x.shape[1] != X_DIM:
            raise ValueError(f"expected molecular graphs of shape (batch_size, {X_DIM}), got {tuple(x.shape)}")
        nodes, edges = split_x(x)
        h = self.node_in(torch.cat([nodes, valence_features(edges)], dim=-1))
        e = edges_to_matrix(self.edge_in(edges)) * self.off_diagonal.unsqueeze(-1)
        for layer in self.layers:
            h, e = layer(h, e, emb, self.off_diagonal)
        return h, e


class GraphScoreNet(nn.Module):
    """An eps-predicting permutation-equivariant graph network that returns the score; 0.4M parameters at defaults.

    Args:
        sde: the SDE the network is trained with (turns the eps prediction into a score).
        hidden: node state width.
        edge_hidden: edge state width.
        n_layers: message-passing layers.
        emb_dim: width of the time embedding (and of any ``extra_emb``).
        n_adjacency: soft adjacency channels per layer.
        n_fourier: Fourier features of t.
    """

    def __init__(self, sde: SDE, hidden: int = 128, edge_hidden: int = 64, n_layers: int = 6, emb_dim: int = 128,
                 n_adjacency: int = 4, n_fourier: int = 32):
        super().__init__()
        self.sde = sde
        self.config = dict(hidden=hidden, edge_hidden=edge_hidden, n_layers=n_layers, emb_dim=emb_dim,
                           n_adjacency=n_adjacency, n_fourier=n_fourier)
        self.emb_dim, self.n_fourier = emb_dim, n_fourier
        self.time_mlp = nn.Sequential(nn.Linear(n_fourier, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.trunk = GraphTrunk(hidden, edge_hidden, emb_dim, n_layers, n_adjacency)
        self.node_out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(),
                                      nn.Linear(hidden, N_NODE_TYPES))
        self.edge_out = nn.Sequential(nn.LayerNorm(edge_hidden), nn.Linear(edge_hidden, edge_hidden), nn.SiLU(),
                                      nn.Linear(edge_hidden, N_EDGE_TYPES))

    def embed_time(self, t: Tensor, extra_emb: Tensor | None = None) -> Tensor:
        """Time embedding plus ``extra_emb`` (only added when given, so zeros leave every output bit unchanged)."""
        emb = self.time_mlp(fourier_features(t, self.n_fourier))
        if extra_emb is not None:
            emb = emb + extra_emb
        return F.silu(emb)

    def predict_eps(self, x: Tensor, t: Tensor, extra_emb: Tensor | None = None) -> Tensor:
        """Noise prediction eps(x_t, t), (B, 189) -> (B, 189)."""
        t_vec = (t.expand(x.shape[0]) if t.ndim == 0 else t).to(x.dtype)
        h, e = self.trunk(x, self.embed_time(t_vec, extra_emb))
        return join_x(self.node_out(h), self.edge_out(e[:, ROWS, COLS]))

    def forward(self, x: Tensor, t: Tensor, extra_emb: Tensor | None = None) -> Tensor:
        """Score s(x_t, t) = -eps / sigma_t, (B, 189) -> (B, 189); ``extra_emb`` (B, emb_dim) joins the time
        embedding."""
        t_vec = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.sde.score_from_eps(self.predict_eps(x, t_vec, extra_emb), t_vec)


class GraphClassifier(nn.Module):
    """Class logits (or regression outputs) of molecular graphs x (B, 189), optionally noise-conditional.

    Args:
        n_out: number of classes (or outputs of a regressor).
        hidden, edge_hidden, n_layers, n_adjacency: as :class:`GraphScoreNet`.
        time_conditional: whether ``forward`` takes a time t (classifier guidance on x_t).
        dropout: before the read-out.
    """

    def __init__(self, n_out: int, hidden: int = 64, edge_hidden: int = 32, n_layers: int = 4, n_adjacency: int = 4,
                 time_conditional: bool = False, dropout: float = 0.1, n_fourier: int = 16):
        super().__init__()
        self.time_conditional, self.n_fourier = time_conditional, n_fourier
        self.emb = nn.Sequential(nn.Linear(n_fourier, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.trunk = GraphTrunk(hidden, edge_hidden, hidden, n_layers, n_adjacency)
        self.head = nn.Sequential(nn.LayerNorm(2 * hidden), nn.Dropout(dropout), nn.Linear(2 * hidden, hidden),
                                  nn.SiLU(), nn.Linear(hidden, n_out))

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """x (B, 189) (and t (B,) for a time-conditional classifier) -> (B, n_out)."""
        if t is None:
            t = x.new_zeros(x.shape[0])
        t = (t.expand(x.shape[0]) if t.ndim == 0 else t).to(x.dtype)
        h, _ = self.trunk(x, self.emb(fourier_features(t, self.n_fourier)))
        # Sum (over the 9 slots, scaled) and max pooling: the sum carries size-extensive properties
        # (polarizability grows with the number of atoms).
        return self.head(torch.cat([h.sum(dim=1) / MAX_ATOMS, h.amax(dim=1)], dim=-1))


def graph_classifier(x_shape: tuple[int, ...], n_classes: int, **kwargs) -> GraphClassifier:
    """The label config's classifier factory (``_target_: domains.molecules.nets.graph_classifier``)."""
    if tuple(x_shape) != (X_DIM,):
        raise ValueError(f"graph_classifier expects molecular graphs of shape ({X_DIM},), got {tuple(x_shape)}")
    return GraphClassifier(n_classes, **kwargs)
