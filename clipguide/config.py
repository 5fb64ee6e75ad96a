"""The one configuration of a run.

:class:`RunConfig` holds every knob of a generation run.  Presets are named
``RunConfig`` values (``clipguide.presets``), the CLI builds its flags from the
fields below (their ``help`` is the comment), and every output stores the config
as JSON so a run can be replayed.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field

from .engine.augments import check_augments
from .engine.cutouts import SIZE_LAWS
from .engine.devices import resolve_device
from .engine.latents import INIT_LOGITS, LATENT_CLASSES
from .engine.losses import LOSSES as LOSS_FUNCTIONS
from .engine.noise_init import INIT_NOISES
from .engine.optimisers import OPTIMISER_CLASSES, canonical_options, check_optimiser
from .engine.prompts import MAX_SEED, check_prompt
from .engine.state import DTYPES
from .errors import ConfigError


def rated_candidates(candidates: int, shortlist: int) -> int:
    """How many of a run's prior candidates the full views score (and --prior-resample can complete)."""
    return min(shortlist, candidates) if shortlist else candidates


def _f(group: str, default, help: str, choices: tuple | None = None, casefold: bool = False):
    """A dataclass field whose help text, choices and ``--help`` section (a key of GROUPS) the CLI reads;
    ``casefold``: the CLI takes its value in any case (names that come from elsewhere, e.g. torch's Adam)."""
    meta = {"help": help, "group": group, "casefold": casefold}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


# The --help sections, in order: key -> title.  The CLI puts its own flags (output folder,
# threads, audits) in these sections too.
GROUPS = {
    "prompt": "prompt: what to make and where to start",
    "models": "models",
    "output": "output: run length, seeds, image size and snapshots",
    "optimisation": "optimisation: loss and optimiser",
    "latent": "latent: parametrisation and relaxation of the decoder's codes",
    "prior": "prior: a model of the decoder's codes proposes the start and keeps the codes likely",
    "zoom": "zoom video: every N steps the image is zoomed, shifted and re-encoded as the new start (nerdyrodent's -zvid)",
    "cutouts": "cutouts: the crops CLIP sees each step",
    "speed": "speed and memory",
    "audit": "audit: output filter and scores",
}

# Each name list is its table's keys: the table that implements the names is where they live.
LATENTS = tuple(LATENT_CLASSES)
INITS = tuple(INIT_LOGITS)
DISPLAYS = ("argmax", "soft", "sharpie")  # what every latent's display() takes ("sharpie": argmax per parity group)
CUTS = tuple(SIZE_LAWS)
LOSSES = tuple(LOSS_FUNCTIONS)
OPTIMISERS = tuple(OPTIMISER_CLASSES)
PRECISIONS = tuple(DTYPES)
NOISE_INITS = tuple(INIT_NOISES)  # RunConfig.init_noise, or "" for none


@dataclass
class RunConfig:
    # what to make
    prompts: tuple[str, ...] = _f("prompt", (), "prompts, one run each ('text:weight:stop | text2' weighs several)")
    seed: int = _f("output", 0, "seed of the first run; run i of a prompt uses seed + i")
    batch: int = _f("output", 1, "independent runs (seeds) per prompt, optimised together in one batch")
    steps: int = _f("output", 300, "optimiser steps")
    snapshots: tuple[int, ...] = _f("output", (), "steps at which to keep the image, e.g. 100,600,4000 (0 = initial decode); "
                                    "every:N,... also keeps every N-th step (--snapshot-every)")
    snapshot_every: int = _f("output", 0, "also keep the image at every multiple of N steps, 0 included (nerdyrodent's "
                             "-se; 0 = off); the contact sheet shows at most 16 of these")
    story_every: int = _f("prompt", 0, "steps per story phrase: phrase i of 'a ^ b ^ c' is active for steps [i·N, (i+1)·N), cycling (nerdyrodent)")
    size: int = _f("output", 128, "output width in pixels, and height unless --height; W,H or WxH sets both (nerdyrodent's "
                   "-s W H); each a multiple of the decoder's downsampling factor")
    height: int = _f("output", 0, "output height in pixels (0: --size, a square image)")
    # models
    decoder: str = _f("models", "shapes-dvae", "decoder: a name (clipguide models lists them: shapes-dvae, shapes-vqgan, dalle, vqgan-...) "
                      "or a path (decoder.pkl, model .json, taming CONFIG.yaml[:CHECKPOINT.ckpt])")
    clip: str = _f("models", "shapes", "CLIP: shapes, NAME/TAG (open_clip, e.g. ViT-B-32/openai), NAME/PATH or config .json; A+B guides with several")
    device: str = _f("speed", "auto", "torch device: cpu, cuda, cuda:1, mps, or auto (CUDA when available, else "
                      "Apple's MPS, else the CPU; the manifest records the device used)")
    precision: str = _f("speed", "fp32", "arithmetic of the decoder and CLIP: fp32 (as the originals) or bf16 (latents, loss and "
                        "optimiser stay fp32; about 2x faster on CPUs with AVX512-BF16/AMX and on GPUs)", PRECISIONS)
    # latent parametrisation and relaxation (docs/methods.md §2, §5)
    latent: str = _f("latent", "categorical", "parametrisation of the token logits", LATENTS)
    init: str = _f("latent", "randn", "initial logits", INITS)
    init_codes: tuple[int, ...] = _f("latent", (), "codes drawn from for init=onehot-codes (Aleph2Image Gamma)")
    init_scale: float = _f("latent", 1.0, "std of init=randn; value of the chosen code for one-hot inits")
    pyramid: tuple[int, ...] = _f("latent", (), "coarse logit grids added to the token logits, by downsampling factor, e.g. 2,4: "
                                  "a region's tokens then change together (categorical and softmax latents)")
    pyramid_every: int = _f("latent", 0, "coarse to fine: with --pyramid only the coarsest grid learns at first, and each finer "
                            "level (the tokens last) joins this many steps after the one before (0 = all from the start)")
    init_image: str = _f("prompt", "", "start from this image (path or URL): the decoder's encoding of it replaces --init (Crowson)")
    init_noise: str = _f("prompt", "", "start from the decoder's encoding of a seeded noise image, as --init-image does: "
                         "pixels (uniform random pixels) or gradient (random colour ramps) (nerdyrodent's -in; empty: none)")
    init_weight: float = _f("prompt", 0.0, "pull toward the initial latent: init_weight/2 · MSE(latent, initial latent) (Crowson)")
    init_pull: str = _f("prompt", "initial", "what --init-weight pulls toward: initial (the initial latent, a constant weight; "
                        "Crowson) or zero-decay (zero, the weight divided by 2·step + 1; nerdyrodent's generate.py)", ("initial", "zero-decay"))
    temperature: float = _f("latent", 1.0, "inverse temperature multiplying the logits ('hadies')")
    temperature_decay: float = _f("latent", 1.0, "the inverse temperature is divided by this after every step")
    temperature_floor: float = _f("latent", 0.0, "lower bound of the decayed inverse temperature")
    blacklist: bool = _f("latent", False, "bias the OpenAI dVAE's blacklisted codes by -100 (Crowson)")
    # a token prior: a model of the decoder's code grids, which never sees the text
    prior: str = _f("prior", "", "token prior: shapes-prior, a prior .json or a taming Net2Net CONFIG.yaml[:CHECKPOINT.ckpt] "
                    "(empty: none)")
    prior_candidates: int = _f("prior", 0, "code grids drawn from the prior per run; the run starts from the one CLIP rates "
                               "best over its views, as --init-scale times its one-hot codes (0: off)")
    prior_shortlist: int = _f("prior", 0, "score the candidates in two stages: all by one plain whole-image view, then only "
                              "this many best of those over the --cutn views (0: all over the --cutn views)")
    prior_resample: int = _f("prior", 0, "then resample the best candidates' lower rows: each of the --prior-resample-top best "
                             "is kept down to every row of --prior-keep and completed this many times by the prior, and the "
                             "run starts from the best of them all over the --cutn views (0: off)")
    prior_resample_top: int = _f("prior", 4, "how many of the best-rated candidates --prior-resample completes")
    prior_keep: tuple[float, ...] = _f("prior", (0.25, 0.375, 0.5, 0.625, 0.75),
                                       "where --prior-resample cuts the candidates, as fractions of the grid's rows kept")
    prior_clip: str = _f("prior", "", "the CLIP that rates the candidates and completions, a --clip spec (e.g. a larger one "
                         "than the CLIP that guides the steps); empty: the run's --clip")
    prior_weight: float = _f("prior", 0.0, "weight of the prior's negative log-likelihood of the relaxed codes, in nats per "
                             "code, added to the loss (0: off)")
    # decoding
    noise_scale: float = _f("latent", 0.0, "Laplace pixel noise of the dVAE's output distribution while training (Crowson: 1)")
    display_noise: bool = _f("output", False, "also sample the pixel noise in snapshots (Crowson's sample_outputs)")
    clamp_grad: bool = _f("latent", True, "clamp pixels with a gradient that pushes back into range (Crowson's ClampWithGrad)")
    display: str = _f("output", "argmax", "how snapshots decode the latent", DISPLAYS)
    ema: float = _f("output", 0.0, "snapshots decode an exponential moving average of the latent with this decay (0 = off)")
    # the zoom video (clipguide/engine/zoom.py): a re-encoding of the zoomed image after updates N-1, 2N-1, ...
    zoom_every: int = _f("zoom", 0, "zoom every N steps: the image after N·m updates is zoomed, shifted and encoded back "
                         "(a decoder with an encoder), the optimiser reset; snapshot every N steps for a zoom video (0: off)")
    zoom_scale: float = _f("zoom", 1.0, "the zoom's magnification about the centre, e.g. 1.02 (below 1 zooms out)")
    zoom_shift: tuple[int, ...] = _f("zoom", (), "the zoom's shift DX,DY in whole pixels, wrapping around (e.g. 2,0 moves "
                                     "the image 2 pixels right; write --zoom-shift=-2,0 for negative ones)")
    # cutouts (what CLIP sees each step)
    cutn: int = _f("cutouts", 32, "cutouts per run and step")
    cut_batch: int = _f("speed", 0, "cutouts per CLIP pass in the backward (0 = all at once): fewer hold less memory for the same arithmetic")
    compile: bool = _f("speed", False, "run the decoder's and CLIP's forward through torch.compile: the first steps compile "
                       "(seconds to minutes), then steps are faster where the backend pays; results equal eager's to "
                       "float rounding, not bit for bit")
    cut: str = _f("cutouts", "crowson", "cutout size law: crowson (u^cut_pow), uniform (lo..hi), normal (mean, std, lo, hi), "
                  "pooled (every cutout the whole image, average+max pooled, as nerdyrodent: use with --augments)", CUTS)
    cut_pow: float = _f("cutouts", 1.0, "Crowson's size exponent (1 = uniform sizes)")
    cut_range: tuple[float, ...] = _f("cutouts", (), "size law parameters as fractions of the side (uniform: lo,hi; normal: mean,std,lo,hi)")
    cut_resample: str = _f("cutouts", "lanczos", "cutout resizing: lanczos (anti-aliased, Crowson) or bilinear (Aleph2Image)", ("lanczos", "bilinear"))
    cut_noise: float = _f("cutouts", 0.0, "Gaussian noise added to the cutouts, times one U(0,1) per step (Aleph2Image Delta: 0.2)")
    cut_flip: bool = _f("cutouts", False, "random horizontal flips of the cutouts")
    cut_affine: float = _f("cutouts", 0.0, "random rotation of each cutout by up to ± this many degrees, and a shift of up to degrees/3 %")
    cut_whole: float = _f("cutouts", 0.0, "fraction of the cutouts that show the whole image (of a non-square "
                         "image: the short side's square, at a random place along the long side)")
    cut_mirror: float = _f("cutouts", 0.0, "the whole-image views zoom out by up to this fraction of the side (below 1), at a random "
                           "offset, the image mirrored beyond its edges: a shape that touches the frame is seen doubled")
    cut_clamp: bool = _f("cutouts", False, "clamp the cutouts to [0, 1] with a pass-through gradient, as Crowson's "
                         "MakeCutouts does (its Lanczos resize overshoots the range)")
    cut_roll: int = _f("cutouts", 0, "shift the image circularly by up to ± this many pixels before the cutouts (DeepDream's jitter)")
    cut_noise_each: bool = _f("cutouts", False, "draw --cut-noise's strength once per cutout instead of once per run and step "
                              "(nerdyrodent's MakeCutouts)")
    augments: tuple[str, ...] = _f("cutouts", (), "Kornia augmentations of the cutouts, in order, by nerdyrodent's -aug names: "
                                   "Ji Sh Gn Pe Ro Af Et Ts Cr Er Re, e.g. Af,Pe,Ji,Er (pip install 'clipguide[kornia]')")
    # loss
    loss: str = _f("optimisation", "spherical", "spherical distance (Crowson) or negative cosine (Aleph2Image)", LOSSES)
    loss_scale: float = _f("optimisation", 1.0, "multiplier of the prompt loss (Aleph2Image: 10)")
    tv_weight: float = _f("optimisation", 0.0, "total-variation weight (Crowson's tv_weight; applied as /4)")
    # optimiser
    optimiser: str = _f("optimisation", "adamw", "optimiser: any torch.optim one by name, case-insensitive (diffgrad and "
                        "adamp from the optimizers extra)", OPTIMISERS, casefold=True)
    optimiser_options: str = _f("optimisation", "", "keyword arguments of the optimiser, e.g. momentum=0.9,betas=[0.5,0.99] "
                                "or a JSON object (the learning rate is --lr, the weight decay --weight-decay)")
    lr: float = _f("optimisation", 0.05, "learning rate")
    lr_growth: float = _f("optimisation", 1.0, "the learning rate is multiplied by this after every step (Aleph2Image Delta: 1.005)")
    lr_warmup: int = _f("optimisation", 0, "steps of linear learning-rate warm-up (independent of --steps)")
    weight_decay: float = _f("optimisation", 0.0, "weight decay, for the optimisers that take one (AdamW: decoupled); adam refuses it")

    def __post_init__(self):
        self.prompts = (self.prompts,) if isinstance(self.prompts, str) else tuple(self.prompts)  # one prompt, not its letters
        self.size, self.height = _size_pair(self.size, self.height)  # size=(W, H) or "WxH" sets both
        self.snapshots, self.snapshot_every = _snapshot_list(self.snapshots, self.snapshot_every)
        self.optimiser = self.optimiser.lower() if isinstance(self.optimiser, str) else self.optimiser
        if isinstance(self.optimiser_options, str):  # one spelling per set of options (manifests, resume)
            self.optimiser_options = canonical_options(self.optimiser_options)
        self.init_codes = tuple(int(c) for c in self.init_codes)
        self.pyramid = tuple(int(k) for k in self.pyramid)
        self.cut_range = tuple(float(c) for c in self.cut_range)
        self.prior_keep = tuple(float(f) for f in self.prior_keep)
        self.augments = (self.augments,) if isinstance(self.augments, str) else tuple(self.augments)
        self.zoom_shift = tuple(int(d) for d in self.zoom_shift)
        self.validate()

    def check_zoom(self) -> None:
        """The zoom's fields: a scale and shift only with --zoom-every."""
        if self.zoom_every < 0:
            raise ConfigError(f"--zoom-every must be 0 (off) or a positive number of steps, got {self.zoom_every}")
        if not 0 < self.zoom_scale < float("inf"):
            raise ConfigError(f"--zoom-scale must be a positive magnification (1.02 zooms in 2%), got {self.zoom_scale}")
        if len(self.zoom_shift) not in (0, 2):
            raise ConfigError(f"--zoom-shift takes two whole pixel counts DX,DY, got {list(self.zoom_shift)}")
        if not self.zoom_every and (self.zoom_scale != 1 or any(self.zoom_shift)):
            raise ConfigError("--zoom-scale and --zoom-shift act every --zoom-every N steps: add --zoom-every N")

    def check_size(self) -> None:
        """The width and height (whether the decoder's factor divides them: ``grid_of``)."""
        if self.size < 8:
            raise ConfigError(f"--size must be at least 8 pixels, got {self.size}")
        if self.height and self.height < 8:
            raise ConfigError(f"--height must be 0 (a square, as --size) or at least 8 pixels, got {self.height}")

    def check_cutouts(self) -> None:
        """The augmentations' names, and what the pooled views leave no room for."""
        check_augments(self.augments)
        if self.cut == "pooled" and (self.cut_whole or self.cut_flip or self.cut_pow != 1.0):
            raise ConfigError("--cut pooled views the whole image in every cutout: --cut-whole, --cut-flip and "
                              "--cut-pow do not apply (flip or move the views with --augments, e.g. Af,Pe)")

    def check_prior(self) -> None:
        """The prior's fields go together: a prior with something to do, on a code-weight latent."""
        if self.prior_candidates < 0 or self.prior_weight < 0:
            raise ConfigError(f"--prior-candidates and --prior-weight must be 0 (off) or more, got "
                              f"{self.prior_candidates} and {self.prior_weight}")
        uses = bool(self.prior_candidates or self.prior_weight)
        if uses != bool(self.prior):
            raise ConfigError("--prior-candidates and --prior-weight need --prior (e.g. --prior shapes-prior)" if uses else
                              f"--prior {self.prior} does nothing alone: add --prior-candidates N and/or --prior-weight W")
        if self.prior and self.latent == "zquantize":
            raise ConfigError("--prior models code grids: use it with a code latent (categorical, softmax, ...), not zquantize")
        if self.prior_shortlist < 0 or self.prior_shortlist > self.prior_candidates:
            raise ConfigError(f"--prior-shortlist must be 0 (off) or 1..--prior-candidates ({self.prior_candidates}): it "
                              f"keeps that many of the candidates for the full views, got {self.prior_shortlist}"
                              + ("; add --prior-candidates N" if not self.prior_candidates else ""))
        self.check_resample()
        if self.prior_clip and not self.prior_candidates:
            raise ConfigError(f"--prior-clip {self.prior_clip} rates the prior's candidates: add --prior-candidates N, "
                              "or leave --prior-clip out")
        if self.prior_candidates and (self.init_image or self.init_noise):
            raise ConfigError(f"--prior-candidates and --init-{'image' if self.init_image else 'noise'} both choose "
                              "where a run starts: drop one")

    def check_resample(self) -> None:
        """--prior-resample completes candidates that the rerank rated: it needs them, and cuts inside the grid."""
        if self.prior_resample < 0 or self.prior_resample_top < 1:
            raise ConfigError(f"--prior-resample must be 0 (off) or more and --prior-resample-top 1 or more, got "
                              f"{self.prior_resample} and {self.prior_resample_top}")
        if not self.prior_resample:
            return
        rated = rated_candidates(self.prior_candidates, self.prior_shortlist)
        if self.prior_resample_top > rated:
            raise ConfigError(f"--prior-resample-top {self.prior_resample_top} is more than the {rated} candidates rated over "
                              "the views: raise --prior-candidates (or --prior-shortlist), or lower --prior-resample-top")
        if not self.prior_keep or not all(0 < f < 1 for f in self.prior_keep):
            raise ConfigError(f"--prior-keep takes fractions of the grid's rows between 0 and 1 (e.g. 0.25,0.5,0.75), "
                              f"got {list(self.prior_keep)}")

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and what would be valid."""
        check_optimiser(self.optimiser, self.optimiser_options, self.weight_decay)  # says why an unlisted one is
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{_flag(f.name)} {getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be a positive number of steps, got {self.steps}")
        if self.snapshot_every < 0:
            raise ConfigError(f"--snapshot-every must be 0 (off) or a number of steps, got {self.snapshot_every}")
        if self.init_noise and self.init_noise not in NOISE_INITS:
            raise ConfigError(f"--init-noise {self.init_noise!r} is not one of {', '.join(NOISE_INITS)}")
        if self.batch < 1:
            raise ConfigError(f"--batch must be at least 1, got {self.batch}")
        if self.seed < 0 or self.seed + self.batch - 1 > MAX_SEED:  # run seeds seed..seed+batch-1 seed 64-bit generators
            raise ConfigError(f"--seed must be 0 or more and --seed + --batch - 1 at most 2**63 - 1, "
                              f"got seed {self.seed}, batch {self.batch}")
        if self.cutn < 1:
            raise ConfigError(f"--cutn must be at least 1, got {self.cutn}")
        if any(k < 2 for k in self.pyramid) or len(set(self.pyramid)) != len(self.pyramid):
            raise ConfigError(f"--pyramid takes distinct downsampling factors of 2 or more (e.g. 2,4), got {list(self.pyramid)}")
        if self.pyramid_every < 0 or (self.pyramid_every and not self.pyramid):
            raise ConfigError(f"--pyramid-every needs --pyramid (e.g. --pyramid 2,4) and 0 or more steps, got {self.pyramid_every}")
        if self.cut_roll < 0:
            raise ConfigError(f"--cut-roll must be 0 (off) or a number of pixels, got {self.cut_roll}")
        if not 0 <= self.cut_mirror < 1 or (self.cut_mirror and not self.cut_whole):
            raise ConfigError(f"--cut-mirror needs --cut-whole (the views it zooms out) and a value in [0, 1), got {self.cut_mirror}")
        if self.cut_batch < 0:
            raise ConfigError(f"--cut-batch must be 0 (all cutouts at once) or a positive count, got {self.cut_batch}")
        self.check_size()
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        bad = [s for s in self.snapshots if s < 0 or s > self.steps]
        if bad:
            raise ConfigError(f"--snapshots {bad[0]} is outside 0..{self.steps}: raise --steps or drop that snapshot")
        if self.init == "onehot-codes" and not self.init_codes:
            raise ConfigError("--init onehot-codes needs --init-codes, e.g. --init-codes 4846,4368,7675")
        if self.latent == "zquantize" and self.init not in ("onehot", "onehot-codes"):
            raise ConfigError(f"--latent zquantize starts z on codebook vectors, not from --init {self.init}: "
                              "use --init onehot (random codes, Crowson) or onehot-codes")
        need = SIZE_LAWS[self.cut].range_numbers
        if need and len(self.cut_range) != need:
            raise ConfigError(f"--cut {self.cut} needs --cut-range with {need} numbers, got {len(self.cut_range)}")
        for p in self.prompts:
            if isinstance(p, str) and not p.strip():  # check_prompt names a prompt that is not text
                raise ConfigError("empty prompt: give some text, e.g. clipguide generate \"a red circle on a blue background\"")
        self.check_prior()
        self.check_cutouts()
        self.check_zoom()
        if self.story_every < 0:
            raise ConfigError(f"--story-every must be 0 or a positive number of steps, got {self.story_every}")
        if self.init_image and self.init_noise:
            raise ConfigError("--init-image and --init-noise both choose where a run starts: drop one")
        if not self.init_weight >= 0:
            raise ConfigError(f"--init-weight must be 0 or positive (a pull toward the initial latent), got {self.init_weight}")
        for p in self.prompts:  # a typo in a prompt fails here, before any model is loaded
            check_prompt(p, self.story_every)

    def dims(self) -> tuple[int, int]:
        """The output's (width, height) in pixels: ``size`` and ``height`` (``size`` again when 0)."""
        return self.size, self.height or self.size

    def snapshot_steps(self) -> tuple[int, ...]:
        """The steps whose image is kept, the final step aside: ``snapshots`` and every multiple of
        ``snapshot_every`` up to ``steps``."""
        every = range(0, self.steps + 1, self.snapshot_every) if self.snapshot_every else ()
        return tuple(sorted({*self.snapshots, *every}))

    def runs(self) -> list[tuple[str, int]]:
        """The independent runs of this config: (prompt, seed), prompt-major."""
        return [(p, self.seed + i) for p in self.prompts for i in range(self.batch)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config is a JSON object of fields, not {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        types = field_types()
        for name, value in d.items():  # recorded configs (manifests, checkpoints) may be damaged or hostile
            if not _has_type(value, types[name]):
                raise ConfigError(f"config field {name} is {value!r:.60}: expected {_type_name(types[name])}")
        return cls(**d)

    def resolved(self) -> "RunConfig":
        """This config with ``device`` "auto" replaced by the device it runs on (what manifests record)."""

        device = resolve_device(self.device)
        return self if device == self.device else self.replace(device=device)

    def replace(self, **changes) -> "RunConfig":
        """A copy with some fields changed (validated); ``size=(W, H)`` (or "WxH") sets the height too."""
        size = changes.get("size")
        if "height" not in changes and isinstance(parse_size(size) if isinstance(size, str) else size, (tuple, list)):
            changes = {**changes, "height": 0}  # the pair's height replaces this config's
        return dataclasses.replace(self, **changes)


def _snapshot_list(values, every: int) -> tuple[tuple[int, ...], int]:
    """``--snapshots`` as (sorted steps, ``snapshot_every``): "every:N" among the values (or in a
    comma-separated string, e.g. "every:50,7") is the shorthand of ``--snapshot-every N``."""
    values = values.replace(" ", "").split(",") if isinstance(values, str) else values
    steps = set()
    for v in values:
        if isinstance(v, str) and v.startswith("every:"):
            try:
                n = int(v[len("every:"):])
            except ValueError:
                raise ConfigError(f"--snapshots {v!r}: write every:N with a whole number N, e.g. every:50") from None
            if every and every != n:
                raise ConfigError(f"--snapshots {v} and --snapshot-every {every} ask for two intervals: keep one")
            every = n
        elif v != "":
            try:
                steps.add(int(v))
            except (TypeError, ValueError):
                raise ConfigError(f"--snapshots takes steps and every:N, e.g. 0,100,every:50, got {v!r:.40}") from None
    return tuple(sorted(steps)), every


def parse_size(text: str) -> int | tuple[int, int]:
    """``--size`` as typed: N, or a width and a height as W,H or WxH (nerdyrodent's ``-s W H``)."""
    try:
        values = tuple(int(v) for v in text.lower().replace("x", ",").replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise ConfigError(f"--size takes N, W,H or WxH in pixels, e.g. 512,288, got {text!r:.40}")
    return values[0] if len(values) == 1 else values


def _size_pair(size, height: int) -> tuple[int, int]:
    """``size`` and ``height`` as stored: ``size`` the width, ``height`` 0 for a square (one spelling per
    image size, so manifests and resumes compare equal); ``size`` may be (W, H) or "W,H"/"WxH"/"W"."""
    size = parse_size(size) if isinstance(size, str) else size
    if isinstance(size, (tuple, list)):
        if len(size) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
            raise ConfigError(f"--size takes N, W,H or WxH in pixels, e.g. 512,288, got {size!r:.40}")
        if len(size) == 2 and height and height != size[1]:
            raise ConfigError(f"--size {size[0]},{size[1]} and --height {height} give two heights: keep one")
        size, height = size[0], size[-1] if len(size) == 2 else height
    return size, 0 if height == size else height


def _flag(name: str) -> str:
    return name.replace("_", "-")


def short_value(value) -> str:
    """A config value as typed on the command line (``--help`` and ``clipguide presets -v`` show
    values so): 2,4 for tuples, on/off, 10 for 10.0, none for empty."""
    if isinstance(value, tuple):
        return ",".join(short_value(v) for v in value) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        text = repr(value)  # the shortest exact form; only whole numbers end in a zero (".0")
        return text[:-2] if text.endswith(".0") else text
    return str(value) or "none"


def _has_type(value, kind) -> bool:
    """Whether a JSON value fits a field annotation (int, float, str, bool, tuple[X, ...])."""
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return isinstance(value, (list, tuple)) and all(_has_type(v, item) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind) -> str:
    if typing.get_origin(kind) is tuple:
        return f"list of {typing.get_args(kind)[0].__name__}"
    return kind.__name__


def field_types() -> dict[str, type]:
    """Field name -> resolved annotation, for the CLI."""
    return typing.get_type_hints(RunConfig)
