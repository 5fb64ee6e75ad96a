"""Token priors: the interface, clipguide's prior format, the loop's uses of a prior (proposals chosen by
CLIP, the prior term), their refusals, and resuming a run that has one.  The shipped shapes prior's
behaviour is tested in test_prior_shapes.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import clipguide
from clipguide import RunConfig
from clipguide.engine.interfaces import TokenPrior
from clipguide.engine.objective import PriorTerm, View
from clipguide.errors import ConfigError, WeightsError
from clipguide.models.prior import GPTConfig, GridPrior, TokenGPT, bits_per_code
from clipguide.models.priors import load_prior

PROMPT = "a red circle on a blue background"
SMALL = dict(steps=3, cutn=2)


def tiny_prior(seed=0, vocab=512, side=16) -> GridPrior:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GridPrior(TokenGPT(GPTConfig(vocab, side, side, n_embd=32, n_layer=1, n_head=2)), f"tiny-{seed}")


@pytest.fixture(scope="module")
def prior_file(tmp_path_factory):
    """A tiny random prior over shapes-dvae's 16x16 grid of 512 codes, in clipguide's prior format."""
    root = tmp_path_factory.mktemp("prior")
    prior = tiny_prior()
    cfg = prior.model.cfg
    (root / "tiny.json").write_text(json.dumps({"kind": "token_gpt", "config": vars(cfg) | {}}))
    save_file({k: v.contiguous() for k, v in prior.model.state_dict().items()}, root / "tiny.safetensors")
    return root / "tiny.json"


def test_the_prior_implements_the_interface_and_scores_what_it_samples(prior_file):
    prior = load_prior(str(prior_file))
    assert isinstance(prior, TokenPrior) and prior.grid == (16, 16) and prior.vocab_size == 512
    codes = prior.sample(3, torch.Generator().manual_seed(1))
    assert codes.shape == (3, 16, 16) and codes.dtype == torch.int64 and 0 <= int(codes.min()) and int(codes.max()) < 512
    assert torch.equal(codes, prior.sample(3, torch.Generator().manual_seed(1)))
    assert not torch.equal(codes, prior.sample(3, torch.Generator().manual_seed(2)))
    one_hot = F.one_hot(codes, 512).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(prior.log_prob(codes), prior.log_prob(one_hot))
    soft = (one_hot * 3).softmax(1).requires_grad_()
    prior.log_prob(soft).sum().backward()
    assert torch.isfinite(soft.grad).all() and soft.grad.abs().sum() > 0
    assert 0 < bits_per_code(prior, codes) < 20
    assert prior.describe()["sha256"] and prior.describe()["grid"] == [16, 16]


def test_sampling_with_the_cache_matches_the_full_forward():
    """Each sampled code is drawn from the teacher-forced distribution of its prefix."""
    prior = tiny_prior(3)
    codes = prior.sample(2, torch.Generator().manual_seed(0))
    weights = F.one_hot(codes.flatten(1), 512).float()
    logits = prior.model(prior.model.embed(weights))
    gen, want = torch.Generator().manual_seed(0), []
    for t in range(256):
        want.append(torch.multinomial(logits[:, t].softmax(-1), 1, generator=gen)[:, 0])
    assert torch.equal(torch.stack(want, 1).view(2, 16, 16), codes)


def test_the_prior_term_is_its_weight_times_nats_per_code():
    prior = tiny_prior(1)
    codes = F.one_hot(prior.sample(2, torch.Generator().manual_seed(0)), 512).permute(0, 3, 1, 2).float()
    view = View(torch.zeros(2, 3, 8, 8), None, 0, [], codes)
    torch.testing.assert_close(PriorTerm(prior, 0.5)(view), -0.5 * prior.log_prob(codes) / 256)


def test_a_run_with_a_prior_is_reproducible_records_it_and_resumes_bit_for_bit(prior_file, tmp_path):
    kw = dict(prior=str(prior_file), prior_candidates=4, prior_weight=0.5, **SMALL)
    a = clipguide.generate(PROMPT, "shapes", out_dir=tmp_path / "a", **kw)
    b = clipguide.generate(PROMPT, "shapes", **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.losses, b.losses)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["models"]["prior"]["name"] == "tiny" and manifest["config"]["prior_candidates"] == 4

    def stop_at_2(state):
        if state.step == 2:
            raise KeyboardInterrupt

    clipguide.generate(PROMPT, "shapes", out_dir=tmp_path / "c", callback=stop_at_2, **kw)
    resumed = clipguide.resume(tmp_path / "c")
    assert torch.equal(resumed.images, a.images) and torch.equal(resumed.losses, a.losses)


def proposals_of(prior_file, **fields):
    """The shapes recipe with the tiny prior and ``fields``, its models, the quick start's targets, the run's
    target and view seed, and the candidates it draws: what a test of ``propose`` writes out."""
    from clipguide.engine.prompts import encode_targets
    from clipguide.engine.proposals import proposal_seed

    cfg = clipguide.get_preset("shapes").replace(prompts=(PROMPT,), prior=str(prior_file), init_scale=5.0,
                                                  **SMALL, **fields).resolved()
    decoder, clip = clipguide.load_models(cfg)
    prior = load_prior(str(prior_file))
    targets = encode_targets(clip, [PROMPT], cfg, [cfg.seed])
    embeds, weights, stops = targets.at(0)
    target, views = (embeds[0], weights[0], stops[0]), proposal_seed(cfg.seed, 1)
    codes = prior.sample(cfg.prior_candidates, torch.Generator().manual_seed(proposal_seed(cfg.seed, 0)))
    return cfg, decoder, clip, prior, targets, target, views, codes


def test_the_run_starts_from_the_candidate_clip_rates_best(prior_file):
    from clipguide.engine.proposals import candidate_losses, propose

    cfg, decoder, clip, prior, targets, target, views, codes = proposals_of(prior_file, prior_candidates=6)
    start = propose(cfg, prior, decoder, clip, targets, [cfg.seed])
    losses = candidate_losses(cfg, decoder, clip, codes, target, views)
    assert len(set(losses.tolist())) == 6  # the candidates differ, and so do their scores
    assert torch.equal(start[0].argmax(0), codes[int(losses.argmin())]) and float(start.max()) == 5.0
    result = clipguide.optimise(cfg.replace(snapshots=(0,)), decoder, clip, prior=prior)
    chosen = F.one_hot(codes[int(losses.argmin())], 512).permute(2, 0, 1)[None].float()
    assert torch.equal(result.snapshots[0], decoder.decode(chosen).clamp(0, 1))  # step 0 shows it (and its average)


def test_a_shortlist_starts_from_the_full_score_best_of_the_candidates_the_glance_rates_best(prior_file):
    """Two-stage scoring: all candidates seen once, whole; the --prior-shortlist best of those over the full views."""
    from clipguide.engine.proposals import candidate_losses, glance, propose, rank

    cfg, decoder, clip, prior, targets, target, views, codes = proposals_of(prior_file, prior_candidates=8,
                                                                            prior_shortlist=3)
    cheap = candidate_losses(glance(cfg), decoder, clip, codes, target, views)
    full = candidate_losses(cfg, decoder, clip, codes, target, views)
    short = cheap.argsort()[:3].tolist()
    want = min(short, key=lambda i: float(full[i]))
    assert want != int(full.argmin())  # these candidates tell a shortlist from a plain rerank
    order, losses = rank(cfg, decoder, clip, codes, target, views)
    assert sorted(order.tolist()) == sorted(short) and int(order[0]) == want  # the shortlist, best first
    assert torch.equal(losses, full[order]) and bool((losses[1:] >= losses[:-1]).all())
    start = propose(cfg, prior, decoder, clip, targets, [cfg.seed])
    assert torch.equal(start[0].argmax(0), codes[want])
    # A shortlist of every candidate is the plain rerank, bit for bit.
    plain = propose(cfg.replace(prior_shortlist=0), prior, decoder, clip, targets, [cfg.seed])
    assert torch.equal(propose(cfg.replace(prior_shortlist=8), prior, decoder, clip, targets, [cfg.seed]), plain)
    assert torch.equal(plain[0].argmax(0), codes[int(full.argmin())])


def test_a_prefix_is_kept_and_only_the_rest_is_drawn(prior_file):
    """Completions: the given codes stay, the rest is drawn from the generator alone, and a prefix of
    nothing is plain sampling (so the default's candidates keep their bytes)."""
    prior = load_prior(str(prior_file))
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    grids = prior.sample(3, g(4))
    assert torch.equal(prior.sample(3, g(4), prefix=grids.flatten(1)[:, :0]), grids)
    done = prior.sample(3, g(5), prefix=grids.flatten(1)[:, :40])
    assert torch.equal(done.flatten(1)[:, :40], grids.flatten(1)[:, :40])
    assert not torch.equal(done.flatten(1)[:, 40:], grids.flatten(1)[:, 40:])
    assert torch.equal(done, prior.sample(3, g(5), prefix=grids.flatten(1)[:, :40]))  # deterministic in the seed
    whole = prior.sample(3, g(5), prefix=grids.flatten(1))
    assert torch.equal(whole, grids)  # a whole grid given draws nothing


def test_resampling_starts_from_the_best_of_the_candidates_and_their_completions(prior_file):
    """--prior-resample, written out: the best candidates kept down to each cut row, completed by the prior
    from the run's third proposal generator, all scored over the same views; the lowest loss wins."""
    from clipguide.engine.proposals import candidate_losses, kept_rows, proposal_seed, propose, rank

    cfg, decoder, clip, prior, targets, target, views, codes = proposals_of(
        prior_file, prior_candidates=6, prior_resample=3, prior_resample_top=2, prior_keep=(0.25, 0.5), seed=1)
    order, losses = rank(cfg, decoder, clip, codes, target, views)
    assert kept_rows(cfg, 16) == [4, 8]
    pool, scores = [codes[order[0]][None]], [losses[:1]]
    generator = torch.Generator().manual_seed(proposal_seed(cfg.seed, 2))
    for rows in (4, 8):
        prefix = codes[order[:2]].flatten(1)[:, :rows * 16].repeat_interleave(3, 0)  # each top 3 times
        drawn = prior.sample(6, generator, prefix=prefix)
        pool.append(drawn)
        scores.append(candidate_losses(cfg, decoder, clip, drawn, target, views))
    pool, scores = torch.cat(pool), torch.cat(scores)
    want = pool[int(scores.argmin())]
    assert int(scores.argmin()) > 0  # a completion beat the rerank's choice: the test tells them apart
    start = propose(cfg, prior, decoder, clip, targets, [cfg.seed])
    assert torch.equal(start[0].argmax(0), want)
    plain = propose(cfg.replace(prior_resample=0), prior, decoder, clip, targets, [cfg.seed])
    assert torch.equal(plain[0].argmax(0), codes[order[0]])


def test_another_clip_rates_the_proposals_when_the_config_names_one(prior_file, tiny_model_files, tmp_path):
    """--prior-clip: the candidates are rated by that CLIP toward its own encoding of the prompt, while the run's
    CLIP guides the steps; the run records both, and a resume checks both."""
    from clipguide.engine.prompts import encode_targets
    from clipguide.engine.proposals import candidate_losses

    spec = str(tiny_model_files[1])  # a tiny random CLIP: it rates the candidates otherwise than the shapes CLIP
    cfg, decoder, clip, prior, _, target, views, codes = proposals_of(prior_file, prior_candidates=6, prior_clip=spec)
    ranker = clipguide.load_clip(spec)
    embeds, weights, stops = encode_targets(ranker, [PROMPT], cfg, [cfg.seed]).at(0)
    by_ranker = candidate_losses(cfg, decoder, ranker, codes, (embeds[0], weights[0], stops[0]), views)
    assert int(by_ranker.argmin()) != int(candidate_losses(cfg, decoder, clip, codes, target, views).argmin())
    result = clipguide.optimise(cfg.replace(snapshots=(0,)), decoder, clip, prior=prior, ranker=ranker)
    chosen = F.one_hot(codes[int(by_ranker.argmin())], 512).permute(2, 0, 1)[None].float()
    assert torch.equal(result.snapshots[0], decoder.decode(chosen).clamp(0, 1))
    with pytest.raises(ConfigError, match="pass the loaded CLIP to optimise"):
        clipguide.optimise(cfg, decoder, clip, prior=prior)

    kw = dict(prior=str(prior_file), prior_candidates=4, prior_clip=spec, **SMALL)
    done = clipguide.generate(PROMPT, "shapes", out_dir=tmp_path / "a", **kw)
    models = json.loads((tmp_path / "a" / "manifest.json").read_text())["models"]
    assert models["prior_clip"]["sha256"] == ranker.sha256 and models["clip"]["name"] == "shapes"

    def stop_at_2(state):
        if state.step == 2:
            raise KeyboardInterrupt

    clipguide.generate(PROMPT, "shapes", out_dir=tmp_path / "b", callback=stop_at_2, **kw)
    assert torch.equal(clipguide.resume(tmp_path / "b").images, done.images)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())  # a replay names a changed ranking CLIP
    manifest["models"]["prior_clip"]["sha256"] = "0" * 64
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    report = clipguide.replay(tmp_path / "a" / "manifest.json")
    assert report.identical and f"prior_clip sha256: recorded {'0' * 64}, replayed with {ranker.sha256}" in report.differences


def test_the_prior_term_adds_its_nll_to_the_loss(prior_file):
    base = clipguide.generate(PROMPT, "shapes", **SMALL)
    weighted = clipguide.generate(PROMPT, "shapes", prior=str(prior_file), prior_weight=1.0, **SMALL)
    prior = load_prior(str(prior_file))
    assert float(weighted.losses[0, 0]) - float(base.losses[0, 0]) > 0.5 * bits_per_code(prior, prior.sample(
        4, torch.Generator().manual_seed(0)))  # a random prior: several nats per code on anything


@pytest.mark.parametrize("fields, message", [
    (dict(prior="shapes-prior"), "does nothing alone"),
    (dict(prior_candidates=4), "need --prior"),
    (dict(prior="x.json", prior_weight=-1.0), r"0 \(off\) or more"),
    (dict(prior="x.json", prior_weight=1.0, latent="zquantize", init="onehot"), "not zquantize"),
    (dict(prior="x.json", prior_candidates=2, init_image="x.png"), "drop one"),
    (dict(prior="x.json", prior_candidates=4, prior_shortlist=5), r"1\.\.--prior-candidates \(4\)"),
    (dict(prior="x.json", prior_candidates=4, prior_shortlist=-1), "0 \\(off\\)"),
    (dict(prior="x.json", prior_weight=1.0, prior_shortlist=2), "add --prior-candidates N"),
    (dict(prior="x.json", prior_weight=1.0, prior_resample=2), "raise --prior-candidates"),
    (dict(prior="x.json", prior_candidates=8, prior_shortlist=2, prior_resample=2), "more than the 2 candidates rated"),
    (dict(prior="x.json", prior_candidates=8, prior_resample=-1), r"--prior-resample must be 0 \(off\)"),
    (dict(prior="x.json", prior_candidates=8, prior_resample=2, prior_keep=(0.5, 1.0)), "between 0 and 1"),
    (dict(prior="x.json", prior_candidates=8, prior_resample=2, prior_keep=()), "between 0 and 1"),
    (dict(prior="x.json", prior_weight=1.0, prior_clip="shapes"), "add --prior-candidates N, or leave --prior-clip out"),
])
def test_prior_fields_that_do_not_go_together_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**fields)


def test_a_prior_of_other_grids_or_a_missing_file_is_refused_before_the_run(prior_file, tmp_path):
    with pytest.raises(ConfigError, match="16x16 grids of 512 codes, but this run has 8x8"):
        clipguide.generate(PROMPT, "shapes", prior=str(prior_file), prior_weight=1.0, size=64, **SMALL)
    with pytest.raises(WeightsError, match="does not exist"):
        load_prior(str(tmp_path / "absent.json"))
    with pytest.raises(ConfigError, match="unknown prior"):
        load_prior("no-such-prior")
    with pytest.raises(ConfigError, match="pass the loaded prior"):
        cfg = RunConfig(prompts=(PROMPT,), prior=str(prior_file), prior_weight=1.0, **SMALL)
        clipguide.optimise(cfg, *clipguide.load_models(cfg))


def test_an_explicit_start_replaces_the_presets_proposals_but_not_an_explicit_request_for_them():
    """--from / --init-image / --init-noise on the default (which starts from the prior's best candidate) start
    where the user says, keeping the prior's term; asking for candidates as well is still the clash it was."""
    from clipguide.run.generation import make_config

    assert clipguide.get_preset(clipguide.presets.DEFAULT_PRESET).prior_candidates > 0
    for start in (dict(init_image="x.png"), dict(init_noise="pixels")):
        cfg = make_config("a red circle", **start)
        assert (cfg.prior, cfg.prior_candidates, cfg.prior_shortlist, cfg.prior_weight) == ("shapes-prior", 0, 0, 0.1)
    assert make_config("a red circle", init_image="x.png", prior_weight=0.0).prior == ""  # nothing left for it to do
    with pytest.raises(clipguide.ConfigError, match="both choose where a run starts"):
        make_config("a red circle", init_image="x.png", prior_candidates=32)
    assert make_config("a red circle", prior_candidates=8).prior_shortlist == 8  # the default's 32 would not fit
    assert make_config("a red circle", prior_candidates=64).prior_shortlist == 32
    assert make_config("a red circle", prior_candidates=2).prior_resample_top == 2  # nor would its 4 completed
    assert make_config("a red circle", prior_candidates=0, prior_weight=0.1).prior_resample == 0  # nothing to complete
    assert make_config("a red circle", init_image="x.png").prior_resample == 0
    with pytest.raises(clipguide.ConfigError, match="--prior-shortlist"):
        make_config("a red circle", prior_candidates=8, prior_shortlist=9)  # asked for: still refused
    from clipguide.sweeps.spec import SweepSpec  # a sweep overrides the preset by the same rule

    points = SweepSpec.from_dict({"prompt": "a red circle", "axes": {"prior_candidates": [8, 64]}})
    assert [(p.config.prior_candidates, p.config.prior_shortlist) for p in points.points()] == [(8, 8), (64, 32)]
    assert SweepSpec.from_dict({"prompt": "x", "init_noise": "pixels", "axes": {"seed": [0]}}).points()[0].config.prior_candidates == 0
