"""Edit instructions in words for the InstructPix2Pix editor (`icd.editing.ip2p`): "make the circle blue".

An instruction is derived from the word diff of two shapes-world captions that differ in one attribute (the edit
cases of `icd.world.make_case`):

==========  ========================================================================================
kind        templates (the first is the deterministic default)
==========  ========================================================================================
color       make the {ref} {new} | turn the {old} {ref} {new} | change the {ref} to {new}
shape       turn the {ref} into a {new} | make the {ref} a {new} | replace the {ref} with a {new}
background  make the background {new} | turn the background {new} | change the background to {new}
size        make the {ref} {larger|smaller} | {grow|shrink} the {ref} | make the {ref} {large|small}
==========  ========================================================================================

``{ref}`` names the edited object of the *source* by its shape word; when another object of the source has the same
shape, the reference adds the attribute that tells them apart (its colour, else its size, else both), in caption
order: "make the small circle larger". In the colour kind's second template the old colour is always named ("turn
the red circle blue"), so its reference adds a size word only when the colour alone does not disambiguate.

Pure functions (no torch): `instruction` builds one, `INSTRUCTION_WORDS` is exactly the set of words the templates
add to the world's vocabulary (the IP2P model's extended tokenizer appends them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from icd import world

KINDS = world.EDIT_KINDS
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("make the {ref} {new}", "turn the {oldref} {new}", "change the {ref} to {new}"),
    "shape": ("turn the {ref} into a {new}", "make the {ref} a {new}", "replace the {ref} with a {new}"),
    "background": ("make the background {new}", "turn the background {new}", "change the background to {new}"),
    "size": ("make the {ref} {comparative}", "{verb} the {ref}", "make the {ref} {new}"),
}
COMPARATIVE = {"large": "larger", "small": "smaller"}  # size edits: the target size -> its comparative
SIZE_VERB = {"large": "grow", "small": "shrink"}


def _template_words() -> tuple[str, ...]:
    """Every literal word of the templates and the size words they fill in, minus the world's vocabulary."""
    words = [w for ts in TEMPLATES.values() for t in ts for w in t.split() if not w.startswith("{")]
    words += [*COMPARATIVE.values(), *SIZE_VERB.values()]
    known = set(world.vocabulary())
    return tuple(dict.fromkeys(w for w in words if w not in known))


INSTRUCTION_WORDS: tuple[str, ...] = _template_words()  # make, the, turn, change, to, into, replace, with, ...


@dataclass(frozen=True)
class _Caption:
    objects: tuple[tuple[str, str, str], ...]  # (size, colour, shape) in caption (left-to-right) order
    background: str


def _parse(caption: str) -> _Caption:
    """A world caption's objects in their caption order (`world.parse_caption` sorts them) and its background."""
    world.parse_caption(caption)  # CaptionError naming the problem for anything outside the grammar
    words = caption.lower().split()
    body, objects = words[:-4], []
    while body:
        objects.append(tuple(body[1:4]))
        body = body[5:]
    return _Caption(tuple(objects), words[-2])


def reference(obj: tuple[str, str, str], others: Sequence[tuple[str, str, str]], *, with_color: bool = False) -> str:
    """The shortest unambiguous name of `obj` (size, colour, shape) among `others`: its shape word, with its colour
    when another object of that shape has another colour, else its size, else both (`with_color`: the colour is
    always named, and the size only when the colour does not tell the objects apart)."""
    size, color, shape = obj
    rivals = [o for o in others if o[2] == shape]
    if with_color:
        use_color, use_size = True, any(o[1] == color for o in rivals)
    elif not rivals:
        use_color = use_size = False
    elif all(o[1] != color for o in rivals):
        use_color, use_size = True, False
    elif all(o[0] != size for o in rivals):
        use_color, use_size = False, True
    else:  # neither attribute alone separates them: name both
        use_color = use_size = True
    return " ".join([*([size] if use_size else []), *([color] if use_color else []), shape])


def edit_of(source_caption: str, target_caption: str, kind: str) -> tuple[int | None, str, str]:
    """(object index or None for the background, old word, new word) of a one-attribute edit of `kind`;
    ValueError when the captions do not differ by exactly that."""
    if kind not in KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; choose from {', '.join(KINDS)}")
    src, tgt = _parse(source_caption), _parse(target_caption)
    if len(src.objects) != len(tgt.objects):
        raise ValueError(f"the captions name {len(src.objects)} and {len(tgt.objects)} objects: not a {kind} edit")
    changes = [(i, k, a[k], b[k]) for i, (a, b) in enumerate(zip(src.objects, tgt.objects)) for k in range(3)
               if a[k] != b[k]]
    if src.background != tgt.background:
        changes.append((None, None, src.background, tgt.background))
    slot = {"size": 0, "color": 1, "shape": 2, "background": None}[kind]
    if len(changes) != 1 or changes[0][1] != slot:
        raise ValueError(f"{source_caption!r} -> {target_caption!r} is not a one-word {kind} edit")
    i, _, old, new = changes[0]
    return i, old, new


def instruction(source_caption: str, target_caption: str, kind: str, rng=None) -> str:
    """The instruction that turns `source_caption`'s scene into `target_caption`'s ("make the circle blue").
    `rng` (a `numpy.random.Generator`) picks one of the kind's paraphrases; None takes the first (deterministic)."""
    i, old, new = edit_of(source_caption, target_caption, kind)
    templates = TEMPLATES[kind]
    template = templates[0] if rng is None else templates[int(rng.integers(len(templates)))]
    fields = {"new": new, "old": old}
    if i is not None:
        objects = _parse(source_caption).objects
        obj, others = objects[i], [o for j, o in enumerate(objects) if j != i]
        fields["ref"] = reference(obj, others)
        fields["oldref"] = reference(obj, others, with_color=True)
        fields["comparative"], fields["verb"] = COMPARATIVE.get(new, ""), SIZE_VERB.get(new, "")
    return template.format(**fields)


def vocabulary() -> list[str]:
    """The IP2P model's closed vocabulary: the world's words, then `INSTRUCTION_WORDS`."""
    return [*world.vocabulary(), *INSTRUCTION_WORDS]
