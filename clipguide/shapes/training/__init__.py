"""Training of the shapes-world models: a tiny open_clip CLIP, a dall_e dVAE, a taming VQGAN and a token prior.

``python -m clipguide.shapes.train`` (or ``clipguide train-shapes``) runs :func:`main`; :func:`train_shapes` is the
same from Python.  The shipped run is eleven stages (:data:`STAGES`), each a function of the model's module:

* :mod:`.clip_stages`: ``clip``, ``clipft``, ``clipframe``, ``cliprobust``; the CLIP's architecture, objective and
  measures are in :mod:`.clip`;
* :mod:`.dvae`: ``dvae``, ``dvaeft``;
* :mod:`.vqgan`: ``vqgan``, ``vqganft``;
* :mod:`.prior`: ``prior``, ``priorft``;
* :mod:`.clip_prior`: ``clipprior``, the CLIP fine-tuned to rank the prior's samples (after the prior);
* :mod:`.common`: what they share (step budgets, lr schedule, saving, the decoders' crops and measure);
* :mod:`.card`: MODEL_CARD.md, written from the json files.

The models are built directly with open_clip / dall_e / taming.modules (never taming.models).  Experimental
stages that no shipped model uses (CLIP fine-tunes against the generation loop's own images, near misses, whole
adversarial runs) were removed; their results are in the research log, ``benchmarks/shapes_quality_log.md``, and
their code in the git history.
"""

from .card import write_model_card
from .cli import MODELS_DIR, STAGES, main, rejudge_decoders, run_stage, train_shapes
from .clip_prior import finetune_clip_prior
from .clip import build_clip, clip_zero_shot, l2_adversary, load_clip_from, pixel_robustness
from .clip_stages import finetune_clip_dvae_adversarial, finetune_clip_frame, finetune_clip_robust, train_clip
from .dvae import build_dvae, dvae_reconstruct, finetune_dvae, load_dvae_from, train_dvae
from .vqgan import build_vqgan, finetune_vqgan, load_vqgan_from, train_vqgan, vqgan_reconstruct

__all__ = ["MODELS_DIR", "STAGES", "build_clip", "build_dvae", "build_vqgan", "clip_zero_shot", "dvae_reconstruct",
           "finetune_clip_dvae_adversarial", "finetune_clip_frame", "finetune_clip_prior", "finetune_clip_robust",
           "finetune_dvae", "finetune_vqgan", "l2_adversary", "load_clip_from", "load_dvae_from", "load_vqgan_from", "main",
           "pixel_robustness", "rejudge_decoders", "run_stage", "train_clip", "train_dvae", "train_shapes",
           "train_vqgan", "vqgan_reconstruct", "write_model_card"]
