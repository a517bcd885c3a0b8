"""A few held-out world cases for the page: the image and the prompts / blend words they fill in."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

from PIL import Image

from icd import world

# (kind, offset from world.EVAL_SEED_START): held-out seeds, never used for training
CASES = (("color", 1), ("shape", 2), ("background", 3), ("size", 4))


@dataclass(frozen=True)
class Example:
    name: str
    kind: str
    source_prompt: str
    target_prompt: str
    blend: tuple[str, str]
    png: bytes

    def public(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": self.source_prompt, "target": self.target_prompt,
                "blend": " ".join(self.blend), "masactrl": self.kind == "size", "url": f"/api/examples/{self.name}.png"}


@functools.cache
def examples() -> dict[str, Example]:
    out = {}
    for kind, offset in CASES:
        case = world.make_case(kind, world.EVAL_SEED_START + offset)
        buf = io.BytesIO()
        Image.fromarray(case.source).save(buf, format="PNG")
        name = f"{kind}-{offset}"
        out[name] = Example(name=name, kind=kind, source_prompt=case.source_prompt, target_prompt=case.target_prompt,
                            blend=case.blend_words, png=buf.getvalue())
    return out
