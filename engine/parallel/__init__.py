"""Several devices: AsyncDiff (arXiv 2406.06911) for one generation, the UNet sharded for one live
stream, and whole-model replicas for many streams, on ``torch.distributed`` and plain processes.

- :mod:`engine.parallel.split`: the UNet as blocks with explicit skips, cut into k components;
- :mod:`engine.parallel.costs`: what each block costs (estimated from shapes, or measured);
- :mod:`engine.parallel.sampling`: the multi-step txt2img / img2img loop on one device (the reference);
- :mod:`engine.parallel.exchange`: component outputs packed into flat buffers and broadcast;
- :mod:`engine.parallel.asyncdiff`: the AsyncDiff loop of one rank, and its driver;
- :mod:`engine.parallel.launch`: one process per device, torn down together when one fails;
- :mod:`engine.parallel.cli`: ``python -m engine.parallel.asyncdiff``, one picture from the command line;
- :mod:`engine.parallel.fidelity`: PSNR and SSIM against the one-device picture;
- :mod:`engine.parallel.bench`: k processes against one, speed and fidelity.
- :mod:`engine.parallel.sharded`: one live stream, each UNet component (and its weights) on its own
  device, fed the previous call's activations (:mod:`engine.parallel.shard_rank`: one rank's work;
  :mod:`engine.parallel.links`: the point-to-point routes); :mod:`engine.parallel.bench_stream`;
- :mod:`engine.parallel.replicas`: the whole model in one process per device, sessions spread over
  them, for the app (``--devices``); ``replica_*``: the session, the child process, the pipe, the
  shared-memory frame slots.
"""
