#!/usr/bin/env python
"""The OpenVINO side of `bench`: optimum-intel's OV pipelines on requests from stdin, and the export.

    python bench/openvino_bench.py --export --model CHECKPOINT --out DIR   # once per checkpoint
    python bench/openvino_bench.py --model DIR --dtype float32 --threads N # the worker

Runs in its own venv (scripts/setup-openvino: optimum-intel pins transformers < 5.6, hence an older
diffusers than the reference venv). The export is what a user runs, `optimum-cli export openvino
--weight-format fp32`, on a copy of the checkpoint whose text encoder is re-saved with the
`text_model.` key prefix: transformers 5.24 (which wrote the fixtures) saves CLIPTextModel without
it, and transformers 5.5 would load such a file as random weights, silently (the bench's PSNR
against diffusers would show it; the export checks it first).

The worker loads the export with `OVPipelineFor*.from_pretrained(dir, ov_config=…)` (compiling
every model for the CPU: part of the cold start) for the first request's task; other tasks build
their OV pipeline on the already compiled models (`compile_only`), as `from_pipe` does in
diffusers. bfloat16 is OpenVINO's own: `INFERENCE_PRECISION_HINT=bf16` on the fp32 export, as a
user would ask for it; float32 sets `f32` explicitly (the CPU plugin may default to bf16 where the
CPU has it). `INFERENCE_NUM_THREADS` = `--threads`, the thread count every other system gets.
Same request as every system (bench/bench_worker.py): the torch generator seeds the latents in the
diffusers pipeline code the OV pipelines inherit, so images are comparable pixel for pixel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import bench_worker  # first: it takes stdout for the protocol before any library prints

import torch  # noqa: E402

PRECISION = {"float32": "f32", "bfloat16": "bf16"}
# Bump when the export recipe changes: every cached export is redone.
RECIPE = "optimum-cli export openvino --task text-to-image --weight-format fp32; text encoder re-saved with text_model. (v1)"


def source_stamp(model: Path) -> str:
    """What the export was made from: the recipe and every source file's size and mtime."""
    files = {
        str(p.relative_to(model)): [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(model.rglob("*"))
        if p.is_file()
    }
    return json.dumps({"recipe": RECIPE, "model": str(model), "files": files}, sort_keys=True)


def prefixed_text_encoder(src: Path, dst: Path) -> None:
    """`src` (a CLIPTextModel folder) into `dst` with every key under `text_model.`, then checked:
    transformers here must load every weight from it (no missing, unexpected or mismatched key)."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    renamed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()}
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    _, info = CLIPTextModel.from_pretrained(dst, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if bad:
        raise SystemExit(f"text encoder re-saved with the text_model. prefix still loads wrongly: {bad}")


def export(model: Path, out: Path) -> None:
    """Exports `model` to `out` once (a stamp says from what; a changed checkpoint is redone)."""
    model = model.resolve()
    stamp = source_stamp(model)
    stamp_file = out / ".autopipe-export"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        print(f"openvino export: {out} is current", file=sys.stderr)
        return
    work = out.parent / f".{out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    src = work / "checkpoint"
    src.mkdir(parents=True)
    for entry in model.iterdir():
        if entry.name == "text_encoder":
            prefixed_text_encoder(entry, src / entry.name)
        else:
            (src / entry.name).symlink_to(entry)
    cli = Path(sys.executable).parent / "optimum-cli"
    cmd = [str(cli), "export", "openvino", "--model", str(src), "--task", "text-to-image", "--weight-format", "fp32", str(work / "ov")]
    print("openvino export: " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    (work / "ov").rename(out)
    stamp_file.write_text(stamp)
    shutil.rmtree(work)


class Worker(bench_worker.Worker):
    def __init__(self, model: str, dtype: str, threads: int):
        super().__init__()
        self.model = model
        self.ov_config = {"INFERENCE_PRECISION_HINT": PRECISION[dtype], "INFERENCE_NUM_THREADS": str(threads)}

    def load(self, task: str):
        from optimum.intel import OVPipelineForImage2Image, OVPipelineForInpainting, OVPipelineForText2Image
        from optimum.intel.openvino.modeling_diffusion import _get_task_ov_class

        classes = {
            "text2img": OVPipelineForText2Image,
            "img2img": OVPipelineForImage2Image,
            "inpaint": OVPipelineForInpainting,
        }
        if not self.pipes:
            pipe = classes[task].from_pretrained(self.model, device="CPU", ov_config=self.ov_config)
            unet = pipe.unet.request
            print(
                "openvino compiled unet: "
                + ", ".join(
                    f"{k}={unet.get_property(k)}"
                    for k in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "NUM_STREAMS")
                ),
                file=sys.stderr,
            )
            return pipe
        # The other task's OV pipeline on the same compiled models (what from_pipe is in diffusers).
        base = next(iter(self.pipes.values()))
        cls = _get_task_ov_class(classes[task].ov_pipelines_mapping, type(base).__name__)
        return cls(
            unet=base.unet.request,
            vae_decoder=base.vae_decoder.request,
            vae_encoder=base.vae_encoder.request,
            text_encoder=base.text_encoder.request,
            scheduler=base.scheduler,
            tokenizer=base.tokenizer,
            feature_extractor=base.feature_extractor,
            compile_only=True,
            ov_config=base.ov_config,
            model_save_dir=base.model_save_dir,
        )

    def hook_unet(self, pipe) -> None:
        # OVPipelinePart.__call__ calls self.forward: an instance attribute wraps it.
        forward = pipe.unet.forward

        def timed(*args, **kwargs):
            self.unet_called()
            return forward(*args, **kwargs)

        pipe.unet.forward = timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the OpenVINO export (worker) or the checkpoint (--export)")
    ap.add_argument("--export", action="store_true", help="export --model to --out and exit")
    ap.add_argument("--out", type=Path, help="--export: the export's folder")
    ap.add_argument("--dtype", default="float32", choices=sorted(PRECISION))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if args.export:
        if args.out is None:
            ap.error("--export needs --out")
        export(Path(args.model), args.out)
        bench_worker.reply({"ok": True, "export": str(args.out)})
        return
    from importlib.metadata import version

    import diffusers
    import openvino
    import transformers

    torch.set_num_threads(args.threads)
    bench_worker.serve(
        Worker(args.model, args.dtype, args.threads),
        {
            "openvino": openvino.__version__,
            "optimum_intel": version("optimum-intel"),
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "threads": args.threads,
            "inference_precision_hint": PRECISION[args.dtype],
        },
    )


if __name__ == "__main__":
    main()
