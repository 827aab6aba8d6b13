"""What the Python workers of `bench` share: the JSON-lines protocol and one request run as a user runs it.

`bench` (bench/src/systems.rs) starts a worker per (checkpoint, dtype) and sends it the same requests
it sends autopipe, one JSON object per line on stdin; each answer is one JSON line on stdout.
Everything else the libraries print goes to stderr. A worker script imports this module *first*
(before torch or any library that might print), subclasses `Worker` with how it gets a pipeline for
a task and how it times UNet calls, and calls `serve`.

Timings: `wall_ms` is the pipeline call plus PNG encoding (autopipe returns PNG bytes too);
`denoise_ms` runs from the first UNet call to the end of the last step (`callback_on_step_end`);
`load_ms` is the time getting this request's pipeline took (0 when it existed).
"""

from __future__ import annotations

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
from PIL import Image  # noqa: E402


def reply(obj: dict) -> None:
    PROTO.write(json.dumps(obj) + "\n")
    PROTO.flush()


class Worker:
    """One pipeline per task on one checkpoint; subclasses say how a pipeline is made and hooked."""

    def __init__(self) -> None:
        self.pipes: dict[str, object] = {}
        self.first_unet_call: float | None = None
        self.last_step_end: float | None = None
        self.steps = 0

    def load(self, task: str):
        """A new pipeline for `task`: `from_pretrained` for the first, sharing the loaded one's
        components for the others."""
        raise NotImplementedError

    def hook_unet(self, pipe) -> None:
        """Makes every UNet call of `pipe` call `self.unet_called()` first."""
        raise NotImplementedError

    def unet_called(self) -> None:
        if self.first_unet_call is None:
            self.first_unet_call = time.perf_counter()

    def pipe(self, task: str):
        """The pipeline for `task` and how long getting it took (ms; 0 when it existed)."""
        if task in self.pipes:
            return self.pipes[task], 0.0
        t0 = time.perf_counter()
        pipe = self.load(task)
        pipe.set_progress_bar_config(disable=True)
        self.hook_unet(pipe)
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


def serve(worker: Worker, ready: dict) -> None:
    """Says `ready` (plus the import time), then answers request lines until stdin closes."""
    reply({"ready": True, "import_ms": (time.perf_counter() - T_START) * 1e3, **ready})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            out = worker.run(json.loads(line))
        except Exception as e:  # noqa: BLE001 - reported to the driver, which stops the run
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply(out)
