"""``cdsam demo``: a local web page (Gradio) to try prompts on a checkpoint before training more.

(No ``from __future__ import annotations`` here: Gradio reads the handlers' ``gr.Request`` /
``gr.SelectData`` annotations as objects to decide what to inject.)

Upload or pick an image, type prompts (one per line), optionally click foreground points,
and get the overlay, one mask per prompt (downloadable PNGs, the same files `cdsam predict`
writes) and a per-prompt table. With "objects" ticked (checkpoints with the instance heads)
the overlay shows each object in its own layer and the downloads add the 16-bit id PNG
`cdsam predict --instances` writes. Bound to 127.0.0.1 unless ``--host`` says otherwise.
Needs the demo extra: ``pip install -e ".[demo]"``.
"""

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cdsam.data.manifest import slug, to_rgb
from cdsam.errors import UserError
from cdsam.inference.instance_files import id_map
from cdsam.inference.predictor import Predictor

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MAX_PROMPTS = 16
MAX_EXAMPLES = 12
HEADERS = ["prompt", "area (px)", "max prob"]


def parse_prompts(text: str) -> list[str]:
    """One prompt per line (``;`` also separates); blanks dropped, order and first copy kept."""
    parts = [p.strip() for line in (text or "").splitlines() for p in line.split(";")]
    seen: dict[str, None] = {}
    for p in parts:
        if p and slug(p) and p not in seen:
            seen[p] = None
    return list(seen)


def segment(predictor: Predictor, image: Image.Image | None, prompts_text: str,
            clicks: Sequence[tuple[float, float]], threshold: float, out_dir: Path,
            objects: bool = False,
            ) -> tuple[tuple[Image.Image, list[tuple[np.ndarray, str]]], list[str],
                       list[list[Any]]]:
    """One request: → (annotated image, mask PNG paths, rows of prompt / area / max prob
    [/ objects]). ``objects``: each prompt's objects as layers, and their id PNG."""
    if image is None:
        raise UserError("upload or pick an image first")
    prompts = parse_prompts(prompts_text)
    if not prompts:
        raise UserError("type at least one prompt (one per line)")
    if len(prompts) > MAX_PROMPTS:
        raise UserError(f"at most {MAX_PROMPTS} prompts at once, got {len(prompts)}")
    if objects and clicks:
        raise UserError("objects are found from the text alone: clear the clicks, or untick "
                        "objects")
    image = to_rgb(image)
    if objects:
        predictor.require_instances()
    pred = predictor.predict(image, prompts, points=list(clicks) or None, threshold=threshold,
                             return_logits=True, instances=objects)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, rows = [], []
    probs = pred.probs
    for prompt, mask, prob in zip(prompts, pred.masks, probs, strict=True):
        path = out_dir / f"mask__{slug(prompt)}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        files.append(str(path))
        rows.append([prompt, int(mask.sum()), round(float(prob.max()), 4)])
    if pred.instances is None:
        layers = [(m.astype(np.float32), p) for p, m in zip(prompts, pred.masks, strict=True)]
        return (image, layers), files, rows
    path = out_dir / "instances.png"
    Image.fromarray(id_map(pred.instances, image.size)).save(path)
    files.append(str(path))
    for row, found in zip(rows, pred.instances, strict=True):
        row.append(len(found))
    layers = [(m.astype(np.float32), f"{o.prompt} {k + 1} ({s:.2f})")
              for o in pred.instances for k, (m, s) in enumerate(zip(o.masks, o.scores,
                                                                      strict=True))]
    return (image, layers), files, rows


def example_images(folder: str | Path | None) -> list[str]:
    if not folder or not Path(folder).is_dir():
        return []
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [str(p) for p in paths[:MAX_EXAMPLES]]


def build_demo(predictor: Predictor, examples: Sequence[str] = (), title: str = "cdsam"):
    """The Gradio page for one loaded checkpoint."""
    import gradio as gr

    def run(image, prompts_text, clicks, threshold, objects, request: gr.Request):
        try:
            # One folder per browser session: downloads of two users never mix.
            out = Path(tempfile.gettempdir()) / "cdsam-demo" / (request.session_hash or "local")
            start = time.perf_counter()
            annotated, paths, rows = segment(predictor, image, prompts_text, clicks, threshold,
                                             out, objects)
        except UserError as exc:
            raise gr.Error(str(exc)) from None
        found = f" · {sum(r[3] for r in rows)} objects" if objects else ""
        status = (f"{len(rows)} mask{'s' * (len(rows) != 1)}{found} · {len(clicks)} "
                  f"click{'s' * (len(clicks) != 1)} · {time.perf_counter() - start:.2f} s on "
                  f"{predictor.device}")
        table = gr.Dataframe(value=rows, headers=HEADERS + (["objects"] if objects else []))
        return annotated, paths, table, status

    def add_click(clicks, evt: gr.SelectData):
        clicks = [*clicks, (float(evt.index[0]), float(evt.index[1]))]
        return clicks, describe(clicks)

    def describe(clicks) -> str:
        if not clicks:
            return "no clicks (text only); click the image to add foreground points"
        where = ", ".join(f"({x:.0f}, {y:.0f})" for x, y in clicks)
        return f"{len(clicks)} foreground click{'s' * (len(clicks) != 1)}: {where}"

    vocab = predictor.known_prompts
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"### {title}: type what to segment, one prompt per line")
        clicks = gr.State([])
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", sources=["upload", "clipboard"],
                                 elem_id="cdsam-image")
                prompts = gr.Textbox(value="\n".join(vocab[:2]), lines=3, label="prompts",
                                     elem_id="cdsam-prompts",
                                     info=f"trained on {len(vocab)}: {', '.join(vocab[:6])}"
                                          f"{' …' if len(vocab) > 6 else ''}")
                threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="threshold")
                heads = predictor.model.has_instance_heads
                objects = gr.Checkbox(
                    value=False, label="objects", elem_id="cdsam-objects", interactive=heads,
                    info="each object in its own layer, and their id PNG" if heads else
                    "this checkpoint has no instance heads (trained before them)")
                click_text = gr.Markdown(describe([]))
                with gr.Row():
                    go = gr.Button("Segment", variant="primary", elem_id="cdsam-run")
                    clear = gr.Button("Clear clicks")
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[image],
                                label="or pick one")
            with gr.Column():
                status = gr.Markdown("", elem_id="cdsam-status")
                overlay = gr.AnnotatedImage(label="masks", elem_id="cdsam-overlay")
                table = gr.Dataframe(headers=HEADERS, label="per prompt",
                                     elem_id="cdsam-table")
                files = gr.File(label="mask PNGs (and the objects' id PNG)",
                                file_count="multiple",
                                elem_id="cdsam-files")
        image.select(add_click, [clicks], [clicks, click_text])
        image.upload(lambda: ([], describe([])), None, [clicks, click_text])
        clear.click(lambda: ([], describe([])), None, [clicks, click_text])
        go.click(run, [image, prompts, clicks, threshold, objects],
                 [overlay, files, table, status],
                 concurrency_limit=1)
    return demo


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 7860,
          device: str = "auto", examples: str | Path | None = None,
          block: bool = True) -> tuple[Any, str]:
    """Load the checkpoint and serve the page; returns (demo, local URL)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError('cdsam demo needs the demo extra: pip install -e ".[demo]"') from None
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines: no calls home
    from cdsam.inference.predictor import load_model
    from cdsam.runtime import resolve_device

    predictor = load_model(checkpoint, resolve_device(device))
    shown = example_images(examples)
    if host not in ("127.0.0.1", "localhost"):
        log.warning("serving on %s: anyone who can reach this port can use the model", host)
    demo = build_demo(predictor, shown, title=f"cdsam · {Path(checkpoint).name}")
    try:
        _, url, _ = demo.launch(server_name=host, server_port=port, share=False, quiet=True,
                                prevent_thread_lock=True, ssr_mode=False, footer_links=[],
                                allowed_paths=[str(Path(p).parent) for p in shown[:1]])
    except OSError as exc:
        raise UserError(f"--port {port}: cannot serve on {host} ({str(exc).split('.')[0]}); "
                        f"pick another port") from None
    log.info("demo of %s on %s (device %s); Ctrl+C stops it", checkpoint, url,
             predictor.device)
    if block:
        demo.block_thread()
    return demo, url
