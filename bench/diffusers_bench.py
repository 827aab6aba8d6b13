#!/usr/bin/env python
"""The diffusers side of `bench`: a worker that runs diffusers' AutoPipelines on requests from stdin.

The `bench` binary (bench/src/main.rs) starts this script once per (checkpoint, dtype) and sends it
the same requests it sends autopipe, one JSON object per line; each answer is one JSON line on
stdout. Everything else the libraries print goes to stderr.

    python bench/diffusers_bench.py --model DIR --dtype float32 --threads N

The first request loads the checkpoint with the AutoPipeline class of its task
(`AutoPipelineFor*.from_pretrained`); a request for another task reuses the loaded components
through `AutoPipelineFor*.from_pipe`, as a diffusers user switching tasks would. Timings:
`wall_ms` is the pipeline call plus PNG encoding (autopipe returns PNG bytes too); `denoise_ms`
runs from the first UNet call to the end of the last step (`callback_on_step_end`); `load_ms` is
the `from_pretrained` / `from_pipe` time of this request (0 when the pipeline existed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

T_START = time.perf_counter()

# The protocol owns the real stdout; library prints (progress bars, warnings) go to stderr.
PROTO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)

import torch  # noqa: E402
import diffusers  # noqa: E402
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image  # noqa: E402
from PIL import Image  # noqa: E402

CLASSES = {
    "text2img": AutoPipelineForText2Image,
    "img2img": AutoPipelineForImage2Image,
    "inpaint": AutoPipelineForInpainting,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def reply(obj: dict) -> None:
    PROTO.write(json.dumps(obj) + "\n")
    PROTO.flush()


class Worker:
    def __init__(self, model: str, dtype: str, variant: str | None):
        self.model = model
        self.dtype = DTYPES[dtype]
        self.variant = variant
        self.pipes: dict[str, object] = {}
        self.first_unet_call: float | None = None
        self.last_step_end: float | None = None
        self.steps = 0

    def _hooked(self, pipe) -> None:
        pipe.set_progress_bar_config(disable=True)

        def pre_hook(_module, _args):
            if self.first_unet_call is None:
                self.first_unet_call = time.perf_counter()

        if not getattr(pipe.unet, "_bench_hooked", False):
            pipe.unet.register_forward_pre_hook(pre_hook)
            pipe.unet._bench_hooked = True

    def pipe(self, task: str):
        """The pipeline for `task` and how long getting it took (ms; 0 when it existed)."""
        if task in self.pipes:
            return self.pipes[task], 0.0
        t0 = time.perf_counter()
        cls = CLASSES[task]
        if not self.pipes:
            kwargs = {"torch_dtype": self.dtype}
            if self.variant:
                kwargs["variant"] = self.variant
            pipe = cls.from_pretrained(self.model, **kwargs)
        else:
            pipe = cls.from_pipe(next(iter(self.pipes.values())))
        self._hooked(pipe)
        self.pipes[task] = pipe
        return pipe, (time.perf_counter() - t0) * 1e3

    def on_step_end(self, _pipe, _i, _t, callback_kwargs):
        self.last_step_end = time.perf_counter()
        self.steps += 1
        return callback_kwargs

    def run(self, req: dict) -> dict:
        task = req["task"]
        t0 = time.perf_counter()
        pipe, load_ms = self.pipe(task)
        self.first_unet_call = self.last_step_end = None
        self.steps = 0
        kwargs = dict(
            prompt=req["prompt"],
            negative_prompt=req.get("negative_prompt") or None,
            num_inference_steps=req["steps"],
            guidance_scale=req["guidance"],
            generator=torch.Generator("cpu").manual_seed(req["seed"]),
            callback_on_step_end=self.on_step_end,
            output_type="pil",
        )
        if task in ("img2img", "inpaint"):
            kwargs["image"] = Image.open(req["image"]).convert("RGB")
            if req.get("strength") is not None:
                kwargs["strength"] = req["strength"]
        if task == "inpaint":
            kwargs["mask_image"] = Image.open(req["mask_image"]).convert("L")
        if task in ("text2img", "inpaint"):
            kwargs["width"], kwargs["height"] = req["width"], req["height"]
        # As a user calls it (the pipelines' __call__ runs under torch.no_grad()).
        image = pipe(**kwargs).images[0]
        png = io.BytesIO()
        image.save(png, format="PNG")
        t1 = time.perf_counter()
        with open(req["out"], "wb") as f:
            f.write(png.getvalue())
        denoise_ms = 0.0
        if self.first_unet_call is not None and self.last_step_end is not None:
            denoise_ms = (self.last_step_end - self.first_unet_call) * 1e3
        return {
            "ok": True,
            "wall_ms": (t1 - t0) * 1e3,
            "load_ms": load_ms,
            "denoise_ms": denoise_ms,
            "steps": self.steps,
            "pipeline": type(pipe).__name__,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--variant", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    worker = Worker(args.model, args.dtype, args.variant)
    reply(
        {
            "ready": True,
            "import_ms": (time.perf_counter() - T_START) * 1e3,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "threads": torch.get_num_threads(),
        }
    )
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            out = worker.run(json.loads(line))
        except Exception as e:  # noqa: BLE001 - reported to the driver, which stops the run
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply(out)


if __name__ == "__main__":
    main()
