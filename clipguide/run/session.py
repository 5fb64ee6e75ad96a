"""The one function that runs a generation into a folder: :func:`run_session`.

Every caller goes through it (``generate``, the CLI, ``resume``, ``replay``, bias audits, the seed
experiments), so a run folder is always written the same way: snapshots, manifest and contact
sheet (:class:`~clipguide.run.snapshots.Snapshotter`, with the output filter and the scorer), then
the checkpoint of the same step (:class:`~clipguide.run.checkpoints.Checkpointer`), which may
point at the snapshot just written, and both finished with the loop's last state.
"""

from __future__ import annotations

from pathlib import Path

from ..audit.output_filter import OutputFilter
from ..config import RunConfig
from ..engine.loop import as_callbacks, optimise
from ..engine.state import Checkpoint, Result
from ..errors import ConfigError, WeightsError, error_detail
from ..models.loading import load_models, load_prior_of, load_ranker_of
from .checkpoints import DEFAULT_EVERY, Checkpointer
from .snapshots import Snapshotter


def run_session(cfg: RunConfig, out_dir: str | Path | None = None, *, models: tuple | None = None,
                preset: str | None = None, callback=None, overwrite: bool = False, output_filter=None,
                scorer=None, checkpoint_every: int = DEFAULT_EVERY, checkpoint: Checkpoint | None = None,
                manifest: dict | None = None, objective=None, prior=None, ranker=None) -> Result:
    """Run ``cfg`` (its prompts x seeds) and, with ``out_dir``, write its folder as it goes.

    ``models``: (decoder, clip), or None to load the config's (once per process); ``prior``: the token
    prior ``cfg.prior`` names, or None to load it; ``ranker``: likewise the CLIP ``cfg.prior_clip`` names.
    ``callback``: a callable or a sequence of them, called after the folder's own at every step.  ``output_filter``
    screens and ``scorer`` scores every snapshot; a checkpoint is written every ``checkpoint_every``
    steps, at every snapshot and at the end.  ``checkpoint`` with the folder's ``manifest`` continues
    a recorded run from that step, bit for bit (:func:`clipguide.resume`).  ``objective`` replaces
    the CLIP objective (:func:`~clipguide.engine.loop.optimise`).  Without ``out_dir`` nothing is written.
    """
    decoder, clip = models if models is not None else load_models(cfg)
    prior = prior if prior is not None else load_prior_of(cfg)
    ranker = ranker if ranker is not None else load_ranker_of(cfg)
    callbacks = as_callbacks(callback)
    if out_dir is None:
        return optimise(cfg, decoder, clip, callbacks, resume_from=checkpoint, objective=objective, prior=prior,
                        ranker=ranker)
    saver = Snapshotter(out_dir, cfg, preset=preset, overwrite=overwrite or manifest is not None,
                        output_filter=output_filter, scorer=scorer)
    step = None if checkpoint is None else checkpoint.step
    if manifest is not None:
        saver.adopt(manifest, step)
    keeper = Checkpointer(out_dir, checkpoint_every, preset=preset, resumed_at=step)
    result = optimise(cfg, decoder, clip, [saver, keeper, *callbacks], resume_from=checkpoint, objective=objective,
                      prior=prior, ranker=ranker)
    saver.finish(result)
    keeper.finish(result)
    return result


def recorded_audit(manifest: dict, device: str, run_dir: Path) -> dict:
    """Snapshotter options rebuilt from a manifest: the output filter (same CLIP by sha256,
    concepts, thresholds and action) and the scorer, so a resumed run screens and scores its
    snapshots as the run did; a filter that cannot be rebuilt stops the resume."""
    out = {}
    record = manifest.get("filter")
    if record is not None:
        try:
            clip = record["clip"]
            out["output_filter"] = OutputFilter(clip["name"], dict(record["concepts"]), record["action"],
                                                bool(record["keep_flagged"]), device)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"the output filter recorded in {run_dir / 'manifest.json'} cannot be rebuilt "
                              f"({error_detail(e)}): refusing to resume without it") from None
        if getattr(out["output_filter"].clip, "sha256", None) != clip.get("sha256"):
            raise WeightsError(f"the output filter's CLIP {clip['name']} differs from the one {run_dir} was screened "
                               "with (sha256): restore its weights to resume")
    scores = manifest.get("scores")
    if isinstance(scores, dict) and isinstance(scores.get("scorer"), dict) and scores["scorer"].get("name"):
        out["scorer"] = scores["scorer"]["name"]
    return out
