"""Several devices for one generation: AsyncDiff (arXiv 2406.06911) on ``torch.distributed``.

- :mod:`engine.parallel.split`: the UNet as blocks with explicit skips, cut into k components;
- :mod:`engine.parallel.costs`: what each block costs (estimated from shapes, or measured);
- :mod:`engine.parallel.sampling`: the multi-step txt2img / img2img loop on one device (the reference);
- :mod:`engine.parallel.exchange`: component outputs packed into flat buffers and broadcast;
- :mod:`engine.parallel.asyncdiff`: the AsyncDiff loop of one rank, and its driver;
- :mod:`engine.parallel.launch`: one process per device, torn down together when one fails;
- :mod:`engine.parallel.cli`: ``python -m engine.parallel.asyncdiff``, one picture from the command line;
- :mod:`engine.parallel.fidelity`: PSNR and SSIM against the one-device picture;
- :mod:`engine.parallel.bench`: k processes against one, speed and fidelity.
"""
