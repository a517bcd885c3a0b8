"""Do two trees edit alike? Run held-out world edits with the code on PYTHONPATH and save them; compare two saves.

A refactor or an overhead cut that must not change images (RESULTS §4) is checked by running this script with the
tree before (a worktree's ``src`` on ``PYTHONPATH``) and after, then comparing:

    git worktree add /tmp/before HEAD~1
    PYTHONPATH=/tmp/before/src python benchmarks/edit_equivalence.py --out before.npz
    python benchmarks/edit_equivalence.py --out after.npz
    python benchmarks/edit_equivalence.py --compare before.npz after.npz

Each model (default: both built-in ones) edits `--seeds` held-out cases of every kind with its default method,
under P2P (replace + local blend; MasaCtrl for `size`) and a plain swap; the comparison prints the largest pixel
difference per model and control.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def run(models: list[str], seeds: int, out: str) -> None:
    import torch  # heavy: only when editing

    from icd import world
    from icd.editing.controllers import MasaCtrlControls, P2PControls
    from icd.editing.edit import EditControls
    from icd.pipeline import Pipeline

    torch.set_num_threads(1)
    saved = {}
    for name in models:
        pipe = Pipeline.from_pretrained(name)
        for kind in world.EDIT_KINDS:
            for i in range(seeds):
                case = None
                for seed in range(world.EVAL_SEED_START + 900_000 + 1000 * world.EDIT_KINDS.index(kind) + i, 10**10,
                                  100):  # the first seed of this stride that admits the kind
                    try:
                        case = world.make_case(kind, seed)
                        break
                    except world.NoEditError:
                        continue
                inv = pipe.invert(case.source[None], [case.source_prompt])
                words = ((case.blend_words[0],), (case.blend_words[1],))
                control = (EditControls(p2p=None, masactrl=MasaCtrlControls()) if kind == "size" else
                           EditControls(p2p=P2PControls(blend_words=words)))
                for label, controls in (("control", control), ("swap", EditControls(p2p=None))):
                    key = f"{name}/{kind}/{i}/{label}"
                    saved[key] = pipe.edit(inv, [case.target_prompt], controls).images[0]
    np.savez_compressed(out, **saved)
    print(f"wrote {out}: {len(saved)} edits")


def compare(a: str, b: str) -> None:
    x, y = np.load(a), np.load(b)
    if set(x.files) != set(y.files):
        sys.exit(f"the two files hold different edits ({len(x.files)} vs {len(y.files)})")
    worst: dict[str, int] = {}
    for key in x.files:
        model, _, _, label = key.rsplit("/", 3)
        d = int(np.abs(x[key].astype(int) - y[key].astype(int)).max())
        worst[f"{model} {label}"] = max(worst.get(f"{model} {label}", 0), d)
    print(json.dumps({"edits": len(x.files), "max_abs_difference_of_255": worst}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="embedded,embedded-flow", help="comma-separated model names or folders")
    ap.add_argument("--seeds", type=int, default=10, help="cases per edit kind (default %(default)s)")
    ap.add_argument("--out", help="write the edits here (.npz)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two saved files instead")
    args = ap.parse_args()
    if args.compare:
        compare(*args.compare)
    elif args.out:
        run(args.models.split(","), args.seeds, args.out)
    else:
        ap.error("give --out FILE or --compare A B")


if __name__ == "__main__":
    main()
