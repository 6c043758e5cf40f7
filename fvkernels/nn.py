"""`FVVAE`: the FV-VAE layer as an nn.Module to put after any CNN layer (DESIGN §4, Algorithm 1)."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvkernels.common.checks import real_number, whole_number
from fvkernels.common.collectives import sum_over_processes
from fvkernels.common.tensors import length_mask
from fvkernels.ops import dispatch
from fvkernels.pipeline.encode import encoder_forward, fv_vae_encode, prenormalised_sets
from fvkernels.pipeline.official import load_official_weights
from fvkernels.pipeline.params import FVVAEParams

OFFICIAL_LAMBDA_CLS = 1e3


class FVVAE(nn.Module):
    """FV-VAE over the local activations of a CNN layer.

    forward(acts) → normalised Fisher vectors (N, C·(d+1)), differentiable w.r.t. this module and acts;
    loss(acts, labels) → the terms of Algorithm 1; fit_fisher(batches) → the diagonal Fisher buffer.
    In a data-parallel job (fvkernels.training.train(distributed=True)) the statistics computed from data —
    the σx floor and the Fisher — are summed over the processes, so they equal the single-process ones.

    The encoder is `hidden` ReLU layers and a linear layer to the latent size (the official training
    network: 512 → 512 → 256); σx (per channel) and σz (per latent unit) are learned in log space and
    shared over descriptors. σx is bounded below by sigma_floor × the RMS of the pre-normalised
    descriptors of the first training batch: without it σx collapses on near-constant channels and
    1/σx² explodes (DESIGN §5).
    """

    def __init__(self, in_channels: int, latent_dim: int = 256, hidden: Sequence[int] = (512,), *,
                 num_classes: Optional[int] = None, prenorm: Optional[str] = "descriptor",
                 norm_scale: Optional[float] = None, spp: Optional[str] = None, dropout: float = 0.5,
                 lambda_rec: float = 1.0, lambda_reg: float = 1.0, lambda_cls: Optional[float] = None,
                 sigma_floor: float = 0.05, backend: str = "auto") -> None:
        super().__init__()
        in_channels, latent_dim = whole_number("in_channels", in_channels), whole_number("latent_dim", latent_dim)
        hidden = tuple(whole_number(f"hidden[{index}]", width) for index, width in enumerate(hidden))
        num_classes = None if num_classes is None else whole_number("num_classes", num_classes)
        dropout = real_number("dropout (the probability of dropping an input entry)", dropout, minimum=0, below=1)
        lambda_rec, lambda_reg = real_number("lambda_rec", lambda_rec, minimum=0), real_number("lambda_reg", lambda_reg,
                                                                                                minimum=0)
        sigma_floor = real_number("sigma_floor", sigma_floor, minimum=0)
        if lambda_cls is None:  # the official prototxt's weight when there are labels, else FV-VAE⁻
            lambda_cls = OFFICIAL_LAMBDA_CLS if num_classes else 0.0
        lambda_cls = real_number("lambda_cls", lambda_cls, minimum=0)
        if norm_scale is None:
            norm_scale = self.unit_rms_norm_scale(prenorm, in_channels)
        # The constructor's arguments: FVVAE(**model.config) rebuilds the architecture (checkpoints).
        self.config = dict(in_channels=in_channels, latent_dim=latent_dim, hidden=tuple(hidden),
                           num_classes=num_classes, prenorm=prenorm, norm_scale=norm_scale, spp=spp, dropout=dropout,
                           lambda_rec=lambda_rec, lambda_reg=lambda_reg, lambda_cls=lambda_cls,
                           sigma_floor=sigma_floor, backend=backend)
        dispatch.check_backend_name(backend)
        if lambda_cls and not num_classes:
            raise ValueError(f"lambda_cls = {lambda_cls} needs num_classes; pass num_classes, or lambda_cls=0 "
                             "for FV-VAE⁻ (no classification loss)")
        widths = [in_channels, *hidden, latent_dim]
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.decoder = nn.Linear(latent_dim, in_channels)
        self.classifier = nn.Linear(latent_dim, num_classes) if num_classes else None
        self.log_sigma_x = nn.Parameter(torch.zeros(in_channels))
        self.log_sigma_z = nn.Parameter(torch.zeros(latent_dim))
        for layer in [*self.encoder, self.decoder] + ([self.classifier] if self.classifier else []):
            nn.init.xavier_uniform_(layer.weight)  # as the official prototxt
            nn.init.zeros_(layer.bias)
        self.register_buffer("sigma_x_min", torch.zeros(()))
        self.register_buffer("fisher", torch.zeros(in_channels, latent_dim + 1))
        self.register_buffer("fisher_sets", torch.zeros((), dtype=torch.int64))
        # Whether the σx floor is set (sigma_x_min > 0), kept on the host so that no training step reads the
        # buffer back from a GPU; load_state_dict and unpickling set it from the buffer.
        self.has_sigma_floor = False
        self.register_load_state_dict_post_hook(FVVAE._read_sigma_floor_flag)
        self.prenorm, self.norm_scale, self.spp = prenorm, float(norm_scale), spp
        self.dropout, self.sigma_floor, self.backend = dropout, sigma_floor, backend
        self.lambda_rec, self.lambda_reg, self.lambda_cls = lambda_rec, lambda_reg, lambda_cls
        self.to_params()  # validates prenorm/spp now rather than at the first forward

    @staticmethod
    def unit_rms_norm_scale(prenorm: Optional[str], in_channels: int) -> float:
        """The norm_scale that gives the descriptors' entries unit RMS, the scale the initial σx = σz = 1
        assume (with smaller inputs the sampling noise swamps µz and the decoder's ReLUs die early)."""
        if prenorm == "map":
            raise ValueError("prenorm='map' needs an explicit norm_scale: √(T·C) gives unit RMS for maps of T "
                             "positions (the official release's 158 ≈ √(49·512) for VGG pool5)")
        return math.sqrt(in_channels) if prenorm == "descriptor" else 1.0

    # ---- parameters ------------------------------------------------------------------------------------

    @property
    def in_channels(self) -> int:
        return self.decoder.out_features

    @property
    def latent_dim(self) -> int:
        return self.decoder.in_features

    @property
    def output_dim(self) -> int:
        """Features per set of forward's output, C·(d+1): what the next layer (a classifier) takes."""
        return self.in_channels * (self.latent_dim + 1)

    dim = output_dim

    def sigma_x(self) -> Tensor:
        """exp(log σx), at least the floor and never 0 (an exp that underflows would make 1/σx² infinite)."""
        tiny = torch.finfo(self.log_sigma_x.dtype).tiny
        return torch.maximum(self.log_sigma_x.exp(), self.sigma_x_min).clamp_min(tiny)

    @property
    def has_fisher(self) -> bool:
        """Whether the diagonal Fisher is fitted (fit_fisher, or a loaded state): reads fisher_sets."""
        return int(self.fisher_sets) > 0

    def to_params(self) -> FVVAEParams:
        """The layer as FVVAEParams, checked (tensors shared, so gradients flow); fisher only once fitted."""
        return self._as_params(self.fisher if self.has_fisher else None, validate=True)

    def _as_params(self, fisher: Optional[Tensor], validate: bool) -> FVVAEParams:
        last = len(self.encoder) - 1
        return FVVAEParams(
            encoder=[(layer.weight, layer.bias, index < last) for index, layer in enumerate(self.encoder)],
            dec_weight=self.decoder.weight, dec_bias=self.decoder.bias, sigma_x=self.sigma_x(), fisher=fisher,
            prenorm=self.prenorm, norm_scale=self.norm_scale, spp=self.spp, validate=validate)

    def _encoding_params(self) -> FVVAEParams:
        """The layer's current tensors as unchecked FVVAEParams (shapes hold by construction, σx > 0 by sigma_x()),
        made without reading a value: the Fisher scales once fitted, chosen in the graph (unfitted: F = 1, whose
        scaling is exact), so forward never waits for a GPU and torch.compile sees no data-dependent branch."""
        fitted = torch.where(self.fisher_sets > 0, self.fisher, torch.ones_like(self.fisher))
        return self._as_params(fitted, validate=False)

    @staticmethod
    def _read_sigma_floor_flag(module: "FVVAE", incompatible_keys=None) -> None:
        """The host-side flag from the σx floor buffer (one read, after load_state_dict or unpickling)."""
        module.has_sigma_floor = float(module.sigma_x_min) > 0

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "has_sigma_floor" not in state:  # pickled by a release without the flag
            FVVAE._read_sigma_floor_flag(self)

    @classmethod
    def from_official(cls, path, **kwargs) -> "FVVAE":
        """The layer with the weights of the official release's caffe_vae_weights_*.mat (DESIGN §3)."""
        params = load_official_weights(path)
        relus = [relu for _, _, relu in params.encoder]
        if any(relus[-1:]) or not all(relus[:-1]):
            raise ValueError(f"{path}: encoder activations {relus} are not ReLU…ReLU then Linear, "
                             "which is the only encoder shape FVVAE builds")
        hidden = [weight.shape[0] for weight, _, _ in params.encoder[:-1]]
        options = dict(prenorm=params.prenorm, norm_scale=params.norm_scale, spp=params.spp, lambda_cls=0.0)
        options.update(kwargs)
        model = cls(params.channels, params.latent_dim, hidden, **options)
        with torch.no_grad():
            for layer, (weight, bias, _) in zip(model.encoder, params.encoder):
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
            model.decoder.weight.copy_(params.dec_weight)
            model.decoder.bias.copy_(params.dec_bias)
            model.log_sigma_x.copy_(params.sigma_x.log())
        return model

    # ---- encoding --------------------------------------------------------------------------------------

    def forward(self, acts: Tensor, lengths=None) -> Tensor:
        return fv_vae_encode(acts, self._encoding_params(), lengths=lengths, backend=self.backend)

    @torch.no_grad()
    def fit_fisher(self, batches: Iterable, *, distributed: bool = False) -> Tensor:
        """Sets the diagonal Fisher F = mean over sets of G² (DESIGN §1.6) from a stream of batches.

        batches yields acts, or (acts, lengths) pairs (a single acts tensor is one batch); only running
        sums are kept, never the FVs. Empty sets (length 0) carry no information and are not counted.
        distributed: every process of the torch.distributed job calls this with its share of the sets;
        (Σ G², #sets) are all-reduced, so each gets the F of all the shares together.
        """
        if isinstance(batches, Tensor):  # iterating it would take each set as a batch of its rows
            batches = [batches]
        params = self._as_params(None, validate=True)
        total = torch.zeros(self.fisher.numel() + 1, dtype=torch.float64, device=self.fisher.device)
        squares, count = total[:-1].view_as(self.fisher), total[-1:]  # one all-reduce for both
        for batch in batches:
            acts, lengths = batch if isinstance(batch, (tuple, list)) else (batch, None)
            raw = fv_vae_encode(acts, params, lengths=lengths, normalize=False, backend=self.backend)
            squares += raw.square().sum(0, dtype=torch.float64).view_as(squares)
            count += raw.shape[0] if lengths is None else (torch.as_tensor(lengths, device=count.device) > 0).sum()
        sum_over_processes(total, distributed)
        sets = int(count)
        if sets == 0:
            raise ValueError("fit_fisher saw no non-empty set; pass batches of training activations")
        self.fisher.copy_(squares / sets)
        self.fisher_sets.fill_(sets)
        return self.fisher

    # ---- training --------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_sigma_floor(self, acts: Tensor, lengths=None, *, distributed: bool = False) -> None:
        """Sets the σx floor from a batch of training sets (loss() does it on its first training batch).

        distributed: every process passes its share of one global batch and the floor is that of the
        whole batch (the sums behind the RMS are all-reduced).
        """
        x_hat, lengths = prenormalised_sets(acts, self._as_params(None, validate=False), lengths)
        self._set_sigma_floor(x_hat, self._valid_descriptors(x_hat, lengths), distributed)

    def _set_sigma_floor(self, x_hat: Tensor, valid: Tensor, distributed: bool) -> None:
        # float64 sums, so that summing per-process parts gives the single-process floor to the last bit
        sums = torch.stack([x_hat.detach().double().square().masked_select(valid).sum(),
                            valid.sum().double() * x_hat.shape[-1]])
        square_sum, count = sum_over_processes(sums, distributed).tolist()
        floor = self.sigma_floor * math.sqrt(square_sum / max(count, 1))
        # A new tensor, not an in-place fill: a forward of this step may have saved the old value for its backward
        # (forward and loss in one autograd graph, as end-to-end fine-tuning has them).
        self.sigma_x_min = torch.full_like(self.sigma_x_min, floor)
        self.has_sigma_floor = floor > 0  # a batch of empty sets sets none: the next batch tries again

    @staticmethod
    def _valid_descriptors(x_hat: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """(N, T, 1) mask of the descriptors inside each set's length."""
        valid = length_mask(lengths, x_hat.shape[1])
        if valid is None:
            return torch.ones(*x_hat.shape[:2], 1, dtype=torch.bool, device=x_hat.device)
        return valid.unsqueeze(-1)

    def loss(self, acts: Tensor, labels: Optional[Tensor] = None, lengths=None, *,
             noise_seeds: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
        """Algorithm 1's losses, each averaged over the sets of the batch (sums over descriptors inside).

        rec = Σ_t ‖(x̂_t − µx_t)/σx‖²/2 + Σ log σx,  reg = Σ_t KL(N(µz_t, σz²) ‖ N(0, I)),
        cls = cross-entropy of the per-descriptor class scores of z_t max-pooled over the set;
        total = λ_rec·rec + λ_reg·reg + λ_cls·cls. Uses input dropout and one reparameterised sample,
        drawn from the global RNG, or with noise_seeds (one int per set) from a generator per set, so
        that a set's draws do not depend on which other sets share its batch (data-parallel training
        splits each batch over processes).
        """
        params = self._as_params(None, validate=False)
        x_hat, lengths = prenormalised_sets(acts, params, lengths)
        valid = self._valid_descriptors(x_hat, lengths)
        if self.training and not self.has_sigma_floor:
            self._set_sigma_floor(x_hat, valid, distributed=False)

        generators = None
        if self.training and noise_seeds is not None:
            if len(noise_seeds) != x_hat.shape[0]:
                raise ValueError(f"noise_seeds has {len(noise_seeds)} seeds for {x_hat.shape[0]} sets; pass one per set")
            generators = [torch.Generator(device=x_hat.device).manual_seed(int(seed)) for seed in noise_seeds]
        mu_z = encoder_forward(self._input_dropout(x_hat, generators), params.encoder)
        sigma_z = self.log_sigma_z.exp()
        z = mu_z + self._standard_normal(mu_z, generators) * sigma_z if self.training else mu_z
        mu_x = F.relu(self.decoder(z))
        sigma_x = self.sigma_x()

        mask = valid.to(x_hat.dtype)
        descriptors_per_set = mask.sum((1, 2))
        rec = ((x_hat - mu_x) / sigma_x).square().mul(mask).sum((1, 2)) / 2 + descriptors_per_set * sigma_x.log().sum()
        kl = (mu_z.square() + sigma_z.square() - 1).sum(-1) / 2 - self.log_sigma_z.sum()
        reg = kl.mul(mask.squeeze(-1)).sum(1)
        num_sets = max(x_hat.shape[0], 1)  # a batch of no sets has losses 0, not the NaN of an empty mean
        losses = {"rec": rec.sum() / num_sets, "reg": reg.sum() / num_sets}
        if self.classifier is not None and labels is not None:
            labels = self._check_labels(labels, x_hat.shape[0])
            # An empty set has no scores to pool: it takes no part in the mean (which is 0 when all sets are empty),
            # chosen in the graph rather than by indexing, which would read the mask back from the device.
            nonempty = valid.any(1)
            scores = self.classifier(z).masked_fill(~valid, -math.inf).amax(1).masked_fill(~nonempty, 0)
            per_set = F.cross_entropy(scores, labels.to(acts.device), reduction="none") * nonempty.squeeze(-1)
            losses["cls"] = per_set.sum() / nonempty.sum().clamp_min(1)
        else:
            losses["cls"] = rec.new_zeros(())
        losses["total"] = self.lambda_rec * losses["rec"] + self.lambda_reg * losses["reg"] + self.lambda_cls * losses["cls"]
        return losses

    def _check_labels(self, labels, num_sets: int) -> Tensor:
        labels = torch.as_tensor(labels)
        num_classes = self.classifier.out_features
        if labels.shape != (num_sets,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be {num_sets} integer class indices, one per set, got {labels.dtype} "
                             f"of shape {tuple(labels.shape)}")
        # The range check reads the values: on the CPU only (on a GPU it would wait for the device every
        # step; train() checks the whole label set once instead).
        if num_sets and labels.device.type == "cpu" and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes - 1}] for this layer's num_classes={num_classes}, "
                             f"got values from {int(labels.min())} to {int(labels.max())} (0-based class indices?)")
        return labels.long()

    def _input_dropout(self, x_hat: Tensor, generators: Optional[List[torch.Generator]]) -> Tensor:
        if generators is None:
            return F.dropout(x_hat, self.dropout, self.training)
        keep = torch.stack([torch.rand(x_hat.shape[1:], generator=generator, device=x_hat.device, dtype=x_hat.dtype)
                            for generator in generators]) >= self.dropout
        return x_hat * keep / (1 - self.dropout)

    @staticmethod
    def _standard_normal(like: Tensor, generators: Optional[List[torch.Generator]]) -> Tensor:
        if generators is None:
            return torch.randn_like(like)
        return torch.stack([torch.randn(like.shape[1:], generator=generator, device=like.device, dtype=like.dtype)
                            for generator in generators])


# ---- in place of a CNN's global pooling ----------------------------------------------------------------------

POOL_NAMES = ("global_pool", "avgpool", "pool")  # timm's, torchvision's, others'
CLASSIFIER_NAMES = ("fc", "classifier", "head", "last_linear")


def replace_global_pool(model: nn.Module, layer: FVVAE, *, pool: Optional[str] = None,
                        classifier: Optional[str] = None, num_classes: Optional[int] = None) -> nn.Module:
    """Puts `layer` where `model` pools its last feature map globally (a torchvision- or timm-style CNN: ResNet,
    EfficientNet, …) and a linear classifier of layer.output_dim inputs in place of the model's last Linear, so
    that model(images) gives class scores from FV-VAE Fisher vectors, trainable end to end. Returns model.

    pool, classifier: the submodules' names (model.named_modules()); by default a global_pool, avgpool or pool that
    is (or holds) an adaptive pooling to 1×1 — timm's and torchvision's names —, else the model's one such pooling;
    and fc, classifier or head (the one Linear it holds). A model whose head nests them (timm's ConvNeXt:
    head.global_pool, head.norm, head.fc) needs pool= and classifier= and a head without the norm. num_classes: the new classifier's outputs (default: the old classifier's). The model's
    forward needs no change: the layer gives (N, C·(d+1)) vectors, which a flatten after the pooling leaves as they
    are. The layer's in_channels must be the channels of the pooled map.
    """
    if not isinstance(layer, FVVAE):
        raise TypeError(f"layer must be an fvkernels.nn.FVVAE, got {type(layer).__name__}")
    modules = dict(model.named_modules())
    pool = pool or _find_global_pool(model, modules)
    classifier = classifier or next((name for name in CLASSIFIER_NAMES if name in modules), None)
    if classifier not in modules:
        raise ValueError(f"{type(model).__name__} has no classifier named {classifier!r} (tried "
                         f"{', '.join(CLASSIFIER_NAMES)}); pass classifier= with its name from model.named_modules()")
    if pool not in modules:
        raise ValueError(f"{type(model).__name__} has no submodule {pool!r}; pass pool= with the name of its global "
                         "pooling from model.named_modules()")
    linear_name = classifier
    if not isinstance(modules[classifier], nn.Linear):
        linears = [name for name, module in modules[classifier].named_modules() if isinstance(module, nn.Linear)]
        if len(linears) != 1:
            raise ValueError(f"{classifier!r} of {type(model).__name__} holds {len(linears)} nn.Linear layers; "
                             "replace_global_pool replaces a classifier of one (pass classifier= to choose it)")
        linear_name = f"{classifier}.{linears[0]}"
    old = modules[linear_name]
    if old.in_features != layer.in_channels:
        raise ValueError(f"{linear_name!r} of {type(model).__name__} takes {old.in_features} pooled channels but the "
                         f"layer encodes C = {layer.in_channels}; make the layer with in_channels={old.in_features}")
    _set_submodule(model, pool, layer)
    _set_submodule(model, linear_name, nn.Linear(layer.output_dim, num_classes or old.out_features,
                                                 device=old.weight.device, dtype=old.weight.dtype))
    return model


def _is_global_pool(module: nn.Module) -> bool:
    return isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and module.output_size in (1, (1, 1))


def _find_global_pool(model: nn.Module, modules: Dict[str, nn.Module]) -> str:
    """The submodule pooling the last map to 1×1: a conventional name whose module is, or holds, an adaptive pooling
    to 1×1 (timm's SelectAdaptivePool2d holds one), else the one such pooling of the model."""
    for name in POOL_NAMES:
        if name in modules and any(_is_global_pool(module) for module in modules[name].modules()):
            return name
    global_pools = [name for name, module in modules.items() if _is_global_pool(module)]
    if len(global_pools) != 1:
        raise ValueError(f"cannot tell which submodule of {type(model).__name__} is its global pooling (found "
                         f"{global_pools or 'no adaptive pooling to 1×1'}); pass pool= with its name from "
                         "model.named_modules()")
    return global_pools[0]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
