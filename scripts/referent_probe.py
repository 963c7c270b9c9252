"""Where does a zoo VLM's LM hold the objects a position question names? A linear-probe diagnostic.

For held-out (val) scenes it packs position questions as isolated turns (each exactly the
single-question chat) and collects, after every decoder layer, the hidden state at the last
token of each object phrase and at the final ``<|assistant|>`` token. Least squares on two
thirds, held-out R^2 on the rest, for: object A's centre x/y at A's phrase end, B's at B's,
and A's x/y, B's x/y and A-B at the final token. R^2 near 0 everywhere at the final token
means the model never gathers the two positions it must compare.

    python scripts/referent_probe.py --model tiny-qwen2-vl --out docs/results/referent-probe-qwen.json
"""
from __future__ import annotations

import json
import random

import torch
from feature_position_probe import held_out_r2, probe_setup  # noqa: E402  (same folder)

from mmeff.zoo.isolated_turns import isolate_turns
from mmeff.zoo.train_vlm import SPLITS, Batcher, _split_aux


def main() -> None:
    a, model, proc, name = probe_setup(__doc__, 192)
    batcher = Batcher(name, proc, drill=True, position_drill=6)
    assistant = proc.tokenizer.convert_tokens_to_ids("<|assistant|>")
    lo = SPLITS["val"][0]
    rows: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "final": []}
    targets = []
    with torch.no_grad():
        for i in range(0, a.scenes, 8):
            inputs, t = _split_aux(batcher.batch(list(range(lo + i, lo + i + 8)), random.Random(i)))
            seg = inputs["segment_ids"]
            out = model(**isolate_turns(model, inputs), use_cache=False, output_hidden_states=True)
            hs = torch.stack(out.hidden_states[1:], 0)  # [layers, B, T, D]
            idx, xy = t["referent_index"], t["referent_xy"]
            for (ba, ta), (bb, tb), pa, pb in zip(idx[::2], idx[1::2], xy[::2], xy[1::2]):
                s = int(seg[bb, tb])
                final = int(((inputs["input_ids"][bb] == assistant) & (seg[bb] == s)).nonzero()[0])
                rows["a"].append(hs[:, ba, ta])
                rows["b"].append(hs[:, bb, tb])
                rows["final"].append(hs[:, bb, final])
                targets.append(torch.cat([pa, pb, pa - pb]))
    y = torch.stack(targets).float()
    feats = {k: torch.stack(v, 1).float() for k, v in rows.items()}  # [layers, N, D]
    report: dict = {"model": a.model, "scenes": a.scenes, "questions": int(y.shape[0]), "layers": []}
    for layer in range(feats["a"].shape[0]):
        r = lambda where, cols: [round(v, 3) for v in held_out_r2(feats[where][layer], y[:, cols])]  # noqa: E731
        report["layers"].append({"layer": layer, "A_xy_at_A": r("a", [0, 1]), "B_xy_at_B": r("b", [2, 3]),
                                 "A_xy_at_final": r("final", [0, 1]), "B_xy_at_final": r("final", [2, 3]),
                                 "A_minus_B_at_final": r("final", [4, 5])})
        print(report["layers"][-1], flush=True)
    if a.out:
        a.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
