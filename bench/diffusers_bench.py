#!/usr/bin/env python
"""The diffusers side of `bench`: a worker that runs diffusers' AutoPipelines on requests from stdin.

    python bench/diffusers_bench.py --model DIR --dtype float32 --threads N

The first request loads the checkpoint with the AutoPipeline class of its task
(`AutoPipelineFor*.from_pretrained`); a request for another task reuses the loaded components
through `AutoPipelineFor*.from_pipe`, as a diffusers user switching tasks would. Protocol and
timings: bench/bench_worker.py.
"""

from __future__ import annotations

import argparse
import os

import bench_worker  # first: it takes stdout for the protocol before any library prints

import torch  # noqa: E402
import diffusers  # noqa: E402
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image  # noqa: E402

CLASSES = {
    "text2img": AutoPipelineForText2Image,
    "img2img": AutoPipelineForImage2Image,
    "inpaint": AutoPipelineForInpainting,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Worker(bench_worker.Worker):
    def __init__(self, model: str, dtype: str, variant: str | None):
        super().__init__()
        self.model = model
        self.dtype = DTYPES[dtype]
        self.variant = variant

    def load(self, task: str):
        cls = CLASSES[task]
        if not self.pipes:
            kwargs = {"torch_dtype": self.dtype}
            if self.variant:
                kwargs["variant"] = self.variant
            return cls.from_pretrained(self.model, **kwargs)
        return cls.from_pipe(next(iter(self.pipes.values())))

    def hook_unet(self, pipe) -> None:
        # from_pipe shares the UNet module: hook it once.
        if not getattr(pipe.unet, "_bench_hooked", False):
            pipe.unet.register_forward_pre_hook(lambda _module, _args: self.unet_called())
            pipe.unet._bench_hooked = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--variant", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench_worker.serve(
        Worker(args.model, args.dtype, args.variant),
        {"torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads()},
    )


if __name__ == "__main__":
    main()
