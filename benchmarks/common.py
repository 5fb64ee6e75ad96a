"""What the benchmark scripts share: clipguide's own optimisation step as a closure."""

from __future__ import annotations

from clipguide.engine.latents import make_latent
from clipguide.engine.loop import Step
from clipguide.engine.loop import code_bias, grid_of, make_optimiser
from clipguide.engine.state import make_generators
from clipguide.engine.prompts import encode_targets


def build_step(cfg, decoder, clip):
    """A closure running one step of ``cfg``'s batch (forward, backward, optimiser) exactly as
    ``optimise()`` does, without callbacks or snapshots; it takes the step index."""
    runs = cfg.runs()
    seeds = [s for _, s in runs]
    gens = make_generators(seeds)
    latent = make_latent(cfg, decoder.vocab_size, grid_of(cfg, decoder), gens, code_bias(cfg, decoder),
                         decoder=decoder).to(cfg.device)  # as optimise() does
    step = Step.for_prompts(cfg, decoder, clip, latent, encode_targets(clip, [p for p, _ in runs], cfg, seeds), seeds)
    opt = make_optimiser(cfg, [latent.param])

    def once(k: int = 0):
        opt.zero_grad(set_to_none=True)
        step.forward(gens, k, backward=True)
        opt.step()
        latent.end_step()

    return once


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB.  Not ru_maxrss: a child process
    inherits its parent's high-water mark there."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
