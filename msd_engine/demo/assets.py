"""Where the demo keeps its files, its prompt sets and photographs, and the shipped draft heads.

Shipped drafts (`msd_engine/demo/drafts/<mode>/`) are converted drafts without their embedding
table (a frozen copy of the target's, 57 MB, that the package need not carry twice): `config.json`
and `head.safetensors` (float16). `install_draft` puts the target's embedding back and writes an
ordinary converted draft directory that `Engine.load(draft=...)` reads.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from msd_engine.draft.config import DraftConfig
from msd_engine.draft.weights import DRAFT_WEIGHTS_FILE
from msd_engine.weights import CONFIG_FILE, WEIGHTS_FILE

PACKAGE_DIR = Path(__file__).parent
DATA_DIR = PACKAGE_DIR / "data"
SHIPPED_DRAFTS = PACKAGE_DIR / "drafts"
HEAD_FILE = "head.safetensors"
EMBED_KEY = "embed_tokens.weight"
TRAIN_PROMPTS = DATA_DIR / "train_prompts.json"
HELDOUT_PROMPTS = DATA_DIR / "heldout_prompts.json"
PHOTOS = ("astronaut", "camera", "cat", "chelsea", "clock", "coffee", "coins", "grass", "gravel", "brick",
          "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text", "colorwheel")
SAMPLE = {"image": "astronaut", "prompt": "Describe this image in detail."}
# The target runs in float32 on the CPU; its drafts run in bfloat16 there, which halves the draft's
# memory traffic (the draft's round is memory-bound) and leaves the output exact.
DRAFT_DTYPE = "bfloat16"


def demo_home() -> Path:
    """$MSD_ENGINE_CACHE/demo, else ~/.cache/msd-engine/demo."""
    root = os.environ.get("MSD_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "msd-engine")
    return Path(root) / "demo"


def load_prompts(path: Path) -> list[dict]:
    """A prompt set: a JSON list of {"prompt": str, "image": optional photo name}."""
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f"{path}: item {i} has no string 'prompt'")
        if item.get("image") is not None and item["image"] not in PHOTOS:
            raise ValueError(f"{path}: item {i} names image {item['image']!r}, not one of {PHOTOS}")
    return items


def export_photo(name: str, folder: Path) -> Path:
    """scikit-image's photograph `name` as an RGB PNG in `folder` (written once)."""
    path = Path(folder) / f"{name}.png"
    if path.is_file():
        return path
    try:
        import skimage.data
    except ImportError as exc:
        raise RuntimeError("the demo's photographs come from scikit-image: pip install scikit-image") from exc
    from PIL import Image

    if name not in PHOTOS:
        raise ValueError(f"unknown demo photo {name!r}; known: {PHOTOS}")
    pixels = getattr(skimage.data, name)()
    image = Image.fromarray(pixels).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique temporary name: two processes may export the same photo at once
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}-", suffix=".png")
    os.close(fd)
    image.save(tmp)
    os.replace(tmp, path)
    return path


def pack_draft(draft_dir: Path, shipped_dir: Path) -> None:
    """A converted draft -> the shipped form (no embedding table, float16 matrices)."""
    config = DraftConfig.load(Path(draft_dir) / CONFIG_FILE)
    tensors = load_file(str(Path(draft_dir) / DRAFT_WEIGHTS_FILE))
    head = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items() if k != EMBED_KEY}
    shipped_dir = Path(shipped_dir)
    shipped_dir.mkdir(parents=True, exist_ok=True)
    save_file(head, str(shipped_dir / HEAD_FILE), metadata={"format": "msd-engine-demo-draft-head"})
    config.save(shipped_dir / CONFIG_FILE)


def install_draft(mode: str, target_dir: Path, dst: Path, shipped_root: Path = SHIPPED_DRAFTS) -> Path:
    """The shipped `mode` draft + the target's embedding -> a converted draft directory at `dst`."""
    from msd_engine.convert.msd_draft import save_draft

    src = Path(shipped_root) / mode
    if not (src / HEAD_FILE).is_file():
        raise FileNotFoundError(f"{src / HEAD_FILE}: no shipped {mode} draft; build it with `msd-engine demo-recipe`")
    config = DraftConfig.load(src / CONFIG_FILE)
    head = load_file(str(src / HEAD_FILE))
    with safe_open(str(Path(target_dir) / WEIGHTS_FILE), framework="pt") as f:
        embed = f.get_tensor("text.embed_tokens.weight")
    save_draft(Path(dst), config, {**head, EMBED_KEY: embed}, force=True)
    return Path(dst)


def prepare(mode: str, progress: bool = True) -> tuple[Path, Path]:
    """The demo target and the `mode` draft in the demo cache, built or installed when missing or
    when the package ships a different draft than the one installed."""
    from msd_engine.demo.target import ensure_target
    from msd_engine.weights import hash_file

    home = demo_home()
    target = ensure_target(home / "target", progress)
    draft = home / "drafts" / mode
    stamp = draft / "shipped.sha256"
    shipped = hash_file(SHIPPED_DRAFTS / mode / HEAD_FILE).hexdigest()
    if not stamp.is_file() or stamp.read_text().strip() != shipped:
        if progress:
            print(f"installing the shipped {mode} draft in {draft} ...", flush=True)
        install_draft(mode, target, draft)
        stamp.write_text(shipped + "\n")
    return target, draft
